{{/* The PrometheusRule's groups, on metrics that exist: tierwise_operator/metrics.py,
tierwise_operator/webhook.py (WebhookMetrics), tierwise_sidecar/metrics.py. The operator's and the
webhook's jobs are their Services' names (the ServiceMonitor's default job label). SLO burn rates
compare each tier's error ratio with the error budget its own availability objective leaves
(tierwise_tier_availability_objective_ratio, exported by the sidecars from the Policy). */}}
{{- define "tierwise.errorRatio" -}}
(sum by (namespace, tier) (rate(tierwise_requests_total{code=~"5.."}[{{ . }}])) / sum by (namespace, tier) (rate(tierwise_requests_total[{{ . }}])))
{{- end -}}
{{- define "tierwise.burn" -}}
{{- /* The error ratio over two windows both above `factor` times the error budget. */ -}}
({{ include "tierwise.errorRatio" .long }} > on (namespace, tier) group_left() ({{ .factor }} * (1 - max by (namespace, tier) (tierwise_tier_availability_objective_ratio))) and {{ include "tierwise.errorRatio" .short }} > on (namespace, tier) group_left() ({{ .factor }} * (1 - max by (namespace, tier) (tierwise_tier_availability_objective_ratio))))
{{- end -}}
{{- define "tierwise.prometheusRules" -}}
{{- $rule := .Values.monitoring.prometheusRule -}}
{{- $ns := .Release.Namespace -}}
{{- $operator := include "tierwise.operator.metricsService" . -}}
{{- $webhook := include "tierwise.webhook.name" . -}}
{{- $extra := $rule.alertLabels | default dict -}}
{{- /* Self-managed certificates are renewed with a third of their life left: alert at half of
that at most, so a short certValidityHours does not alert on every healthy cycle. */ -}}
{{- $expiry := mul (int $rule.certificateExpiryDays) 86400 -}}
{{- if not .Values.webhook.certManager.enabled -}}
{{- $expiry = min $expiry (mul (int .Values.webhook.certValidityHours) 600) -}}
{{- end -}}
{{- /* "Down" needs the ServiceMonitor's scrapes: without them absent(up) would fire forever. */ -}}
{{- $scraped := .Values.monitoring.serviceMonitor.enabled -}}
groups:
  - name: tierwise-operator
    rules:
      {{- if $scraped }}
      - alert: TierwiseOperatorDown
        expr: >-
          max by (job, namespace) (up{job="{{ $operator }}", namespace="{{ $ns }}"}) == 0
          or absent(up{job="{{ $operator }}", namespace="{{ $ns }}"})
        for: 5m
        labels:
          {{- toYaml (merge (dict "severity" "critical") $extra) | nindent 10 }}
        annotations:
          summary: The tierwise operator is down (or not scraped).
          description: >-
            No operator of release {{ .Release.Name }} in {{ $ns }} has answered /metrics for
            5 minutes. Tiers are not reconciled or autoscaled and Policies are not updated;
            sidecars keep serving with the Policy they have.
      {{- end }}
      - alert: TierwiseOperatorReconcileErrors
        expr: sum by (key, error) (increase(tierwise_operator_reconcile_errors_total{job="{{ $operator }}"}[15m])) > 0
        for: 15m
        labels:
          {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 10 }}
        annotations:
          summary: tierwise reconciles keep failing.
          description: >-
            Reconciles of {{`{{ $labels.key }}`}} keys have failed with {{`{{ $labels.error }}`}}
            for 15 minutes (they are retried with backoff). See the operator's log and
            `kubectl get events -A --field-selector type=Warning`.
      - alert: TierwisePolicyHeld
        expr: max by (namespace) (tierwise_operator_policy_held{job="{{ $operator }}"}) > 0
        for: 15m
        labels:
          {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 10 }}
        annotations:
          summary: A namespace runs on its last good tierwise Policy.
          description: >-
            An object the Policy of namespace {{`{{ $labels.namespace }}`}} uses is invalid, so its
            sidecars keep the previous Policy. `kubectl get inferencetiers,costbudgets,cachepolicies
            -n {{`{{ $labels.namespace }}`}}` shows which (Ready=False, InvalidSpec).
  - name: tierwise-webhook
    rules:
      {{- if $scraped }}
      - alert: TierwiseWebhookDown
        expr: >-
          max by (job, namespace) (up{job="{{ $webhook }}", namespace="{{ $ns }}"}) == 0
          or absent(up{job="{{ $webhook }}", namespace="{{ $ns }}"})
        for: 5m
        labels:
          {{- toYaml (merge (dict "severity" "critical") $extra) | nindent 10 }}
        annotations:
          summary: No tierwise admission webhook is up.
          description: >-
            No webhook pod of release {{ .Release.Name }} in {{ $ns }} has answered /metrics for
            5 minutes.
            {{- if eq .Values.webhook.inject.failurePolicy "Fail" }} Pods in namespaces labelled for injection are refused (failurePolicy Fail).
            {{- else }} Pods in namespaces labelled for injection start without the sidecar (failurePolicy Ignore).
            {{- end }}
      {{- end }}
      - alert: TierwiseWebhookAdmissionErrors
        expr: sum by (operation) (rate(tierwise_webhook_admissions_total{job="{{ $webhook }}", result="error"}[5m])) > 0
        for: 10m
        labels:
          {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 10 }}
        annotations:
          summary: The tierwise webhook cannot answer admission reviews.
          description: >-
            {{`{{ $labels.operation }}`}} reviews have been failing for 10 minutes (unreadable
            review, or the cluster cannot be read); the API server applies the failure policy.
      - alert: TierwiseWebhookCertificateExpiry
        expr: min(tierwise_webhook_certificate_expiry_timestamp_seconds{job="{{ $webhook }}"}) - time() < {{ $expiry }}
        for: 10m
        labels:
          {{- toYaml (merge (dict "severity" "critical") $extra) | nindent 10 }}
        annotations:
          summary: The tierwise webhook's certificate expires soon.
          description: >-
            A webhook replica serves a certificate expiring in less than
            {{ div $expiry 3600 }} hours: rotation is not happening
            {{- if .Values.webhook.certManager.enabled }} (check the Certificate {{ include "tierwise.webhook.certificate" . }} in {{ $ns }}).
            {{- else }} (check the webhook's log and its access to the Secret {{ include "tierwise.webhook.certSecret" . }}).
            {{- end }}
  - name: tierwise-sidecar
    rules:
      - alert: TierwiseTierErrors
        expr: >-
          sum by (namespace, tier) (rate(tierwise_requests_total{code=~"5.."}[5m]))
          / sum by (namespace, tier) (rate(tierwise_requests_total[5m])) > {{ $rule.sidecarErrorRatio }}
        for: 10m
        labels:
          {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 10 }}
        annotations:
          summary: A tier answers too many requests with a server error.
          description: >-
            {{`{{ $value | humanizePercentage }}`}} of the requests of tier {{`{{ $labels.tier }}`}}
            in {{`{{ $labels.namespace }}`}} end in a 5xx (every backend and fallback failed).
      - alert: TierwiseBackendFailing
        expr: >-
          sum by (namespace, tier, backend) (rate(tierwise_upstream_attempts_total{result!~"ok|client_error"}[5m]))
          / sum by (namespace, tier, backend) (rate(tierwise_upstream_attempts_total[5m])) > {{ $rule.backendFailureRatio }}
        for: 10m
        labels:
          {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 10 }}
        annotations:
          summary: A tier backend fails often.
          description: >-
            {{`{{ $value | humanizePercentage }}`}} of the attempts from {{`{{ $labels.namespace }}`}}
            to backend {{`{{ $labels.backend }}`}} of tier {{`{{ $labels.tier }}`}} fail (server error,
            timeout, connection, rate limit); requests are retried and fall back meanwhile.
      - alert: TierwisePolicyRefused
        expr: sum by (namespace, pod) (increase(tierwise_policy_reloads_total{result="refused"}[15m])) > 0
        labels:
          {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 10 }}
        annotations:
          summary: A sidecar refused a new Policy.
          description: >-
            Sidecar {{`{{ $labels.pod }}`}} in {{`{{ $labels.namespace }}`}} could not load the
            Policy ConfigMap and keeps its previous one (its log says why).
  # Multi-window, multi-burn-rate alerts on each tier's availability objective (the SRE workbook's
  # four pairs): a fast burn pages (2% of a 30-day budget in an hour, 5% in six), a slow one
  # opens a ticket (10% in three days).
  - name: tierwise-slo
    rules:
      - alert: TierwiseSLOBurnFast
        expr: >-
          {{ include "tierwise.burn" (dict "long" "1h" "short" "5m" "factor" 14.4) }}
          or {{ include "tierwise.burn" (dict "long" "6h" "short" "30m" "factor" 6) }}
        for: 2m
        labels:
          {{- toYaml (merge (dict "severity" "critical") $extra) | nindent 10 }}
        annotations:
          summary: A tier burns its error budget fast.
          description: >-
            Tier {{`{{ $labels.tier }}`}} in {{`{{ $labels.namespace }}`}} answers
            {{`{{ $value | humanizePercentage }}`}} of its requests with a server error: at this rate its
            availability objective's 30-day error budget is gone in days. `kubectl get inferencetier
            {{`{{ $labels.tier }}`}} -o yaml` shows its backends' numbers and the operator's steering.
      - alert: TierwiseSLOBurnSlow
        expr: >-
          {{ include "tierwise.burn" (dict "long" "1d" "short" "2h" "factor" 3) }}
          or {{ include "tierwise.burn" (dict "long" "3d" "short" "6h" "factor" 1) }}
        for: 15m
        labels:
          {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 10 }}
        annotations:
          summary: A tier burns its error budget faster than it lasts.
          description: >-
            Tier {{`{{ $labels.tier }}`}} in {{`{{ $labels.namespace }}`}} has answered
            {{`{{ $value | humanizePercentage }}`}} of its requests with a server error over the last
            day or days: more than its availability objective allows over 30 days.
  - name: tierwise-budgets
    rules:
      - alert: TierwiseBudgetExceeded
        expr: max by (budget_namespace, budget) (tierwise_budget_state{state="Exceeded"}) == 1
        for: 1m
        labels:
          {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 10 }}
        annotations:
          summary: A CostBudget is exhausted and refuses requests.
          description: >-
            Budget {{`{{ $labels.budget }}`}} in {{`{{ $labels.budget_namespace }}`}} has reached its
            Reject threshold: the requests it counts get 429 budget_exceeded until its period resets
            (`kubectl get costbudget -n {{`{{ $labels.budget_namespace }}`}}` shows when).
      - alert: TierwiseBudgetThreshold
        expr: max by (budget_namespace, budget, state) (tierwise_budget_state{state=~"Warning|Downgraded|Throttled"}) == 1
        for: 5m
        labels:
          {{- toYaml (merge (dict "severity" "info") $extra) | nindent 10 }}
        annotations:
          summary: A CostBudget passed a threshold.
          description: >-
            Budget {{`{{ $labels.budget }}`}} in {{`{{ $labels.budget_namespace }}`}} is
            {{`{{ $labels.state }}`}}: its spend passed a Notify, Downgrade or Throttle threshold.
{{- end -}}
