{{/* Prefix of every object's name. */}}
{{- define "tierwise.fullname" -}}
{{- .Values.fullnameOverride | default .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Names of the objects, in one place (templates and the webhook's flags must agree). */}}
{{- define "tierwise.operator.name" -}}{{ include "tierwise.fullname" . }}-operator{{- end -}}
{{- define "tierwise.operator.metricsService" -}}{{ include "tierwise.fullname" . }}-operator-metrics{{- end -}}
{{- define "tierwise.webhook.name" -}}{{ include "tierwise.fullname" . }}-webhook{{- end -}}
{{- define "tierwise.webhook.mutating" -}}{{ include "tierwise.fullname" . }}-inject{{- end -}}
{{- define "tierwise.webhook.validating" -}}{{ include "tierwise.fullname" . }}-validate{{- end -}}
{{/* Self-managed mode: the Secret the webhook replicas share their certificate through. */}}
{{- define "tierwise.webhook.certSecret" -}}{{ include "tierwise.fullname" . }}-webhook-tls{{- end -}}
{{/* cert-manager mode: its Certificate, and the Secret it writes (another name than the
self-managed one, so switching modes never has two owners of one Secret). */}}
{{- define "tierwise.webhook.certificate" -}}{{ include "tierwise.fullname" . }}-webhook{{- end -}}
{{- define "tierwise.webhook.certManagerSecret" -}}{{ include "tierwise.fullname" . }}-webhook-serving-tls{{- end -}}

{{/* The DNS names the API server reaches the webhook Service by. */}}
{{- define "tierwise.webhook.hosts" -}}
{{- $svc := include "tierwise.webhook.name" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | join "," -}}
{{- end -}}

{{- define "tierwise.image.operator" -}}
{{ .Values.image.operator.repository }}:{{ .Values.image.operator.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tierwise.image.sidecar" -}}
{{ .Values.image.sidecar.repository }}:{{ .Values.image.sidecar.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tierwise.labels" -}}
app.kubernetes.io/name: tierwise
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "tierwise.operator.selector" -}}
app.kubernetes.io/name: tierwise
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "tierwise.webhook.selector" -}}
app.kubernetes.io/name: tierwise
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{/* The pod-level security context of both Deployments: non-root, default seccomp. */}}
{{- define "tierwise.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "tierwise.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}

{{/* The clientConfig of a webhook: the Service, on a path. No caBundle: in self-managed mode the
webhook patches it in at run time (a value rendered here would be reset on every upgrade), and
with cert-manager its cainjector does. */}}
{{- define "tierwise.webhook.clientConfig" -}}
service:
  name: {{ include "tierwise.webhook.name" .ctx }}
  namespace: {{ .ctx.Release.Namespace }}
  path: {{ .path }}
  port: 443
{{- end -}}
