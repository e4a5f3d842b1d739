#!/usr/bin/env bash
# The demo, from a fresh clone: set-up, the reference trace replayed (the savings), a local control
# plane, the CRDs, Prometheus and the operator reading it, the quickstart tiers, budgets and cache
# policy, what kubectl shows of them, the admission webhook injecting the sidecar into a pod and
# refusing a fallback cycle, an invalid object the API server refuses, then traffic through an
# injected sidecar (hack/demo_cluster.py: an SLO breach steering it, a budget crossing its
# thresholds, the dashboard's queries), and the Policy they compile to. KEEP=1 leaves the control
# plane running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

# Bold headings on a terminal only: redirected to a file, the output carries no escape codes.
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }

step "setting up Python (the first result needs nothing else; Kubernetes is built after it)"
PYTHON_ONLY=1 bash hack/setup.sh

out="${TMPDIR:-/tmp}/tierwise-demo"
mkdir -p "$out"
step "what the quickstart Policy saves: a synthetic reference trace (${DEMO_TRACE_SECONDS:-60} s of traffic) replayed three times"
python -m tierwise_sidecar.replay.tracegen --out "$out/trace.jsonl" --duration "${DEMO_TRACE_SECONDS:-60}" \
  --spike-at 30 --spike-len 10 --outage-at 45 --outage-len 5 >"$out/trace-summary.txt"
head -n 4 "$out/trace-summary.txt"
tierwise replay "$out/trace.jsonl" --policy examples/quickstart --out "$out/replay"
python - "$out/replay/report.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
s, saving = doc["strategies"], doc["saving"]
assert s["policy"]["cost_usd"] < s["premium"]["cost_usd"], "demo: the Policy did not cost less than all-premium"
assert abs(sum(saving["byCause"].values()) - saving["usd"]) < 1e-9, "demo: the causes do not add up to the saving"
PY

step "setting up the rest: Debian packages and the Kubernetes binaries (built once, about 13 minutes; cached after)"
bash hack/setup.sh

step "starting a local control plane (etcd + kube-apiserver + controller-manager + scheduler + kwok)"
eval "$(python hack/localcluster.py up --nodes)"
if [ "${KEEP:-0}" != 1 ]; then trap 'python hack/localcluster.py down >/dev/null' EXIT; fi
kubectl() { "$(python -c 'import localcluster; print(localcluster.tool("kubectl"))' 2>/dev/null || echo kubectl)" "$@"; }
export PYTHONPATH="$PWD/hack"
kubectl get nodes

step "installing the CRDs (generated from the pydantic models)"
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established --timeout=60s -f crds/ >/dev/null
kubectl get crds -l app.kubernetes.io/part-of=tierwise

step "starting Prometheus (scraping the sidecar the traffic act runs) and the operator reading it"
export TIERWISE_HEALTH_HOST=127.0.0.1  # servers started here listen on loopback only
metrics_port=$(python -c 'import localcluster; print(localcluster.free_port())')
rm -rf "$out/prometheus"  # a fresh TSDB: an earlier run's spend must not count in this one
eval "$(python hack/promserver.py "$out/prometheus" --target "127.0.0.1:$metrics_port")"
echo "Prometheus at $PROM_URL"
kubectl label namespace default tierwise.dev/injection=enabled --overwrite
# SLO and spend read every second (30 s by default) so the demo's steering and budget show quickly.
tierwise operator --kubeconfig "$KUBECONFIG" --health-port 18081 --prometheus-url "$PROM_URL" \
  --slo-interval 1 --spend-interval 1 >"${TMPDIR:-/tmp}/tierwise-demo-operator.log" 2>&1 &
operator_pid=$!
webhook_pid=
cleanup() {
  kill $operator_pid $webhook_pid $PROM_PID 2>/dev/null; wait $operator_pid $webhook_pid 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then
    # The webhook stops with the demo: a configuration calling it (failurePolicy Fail) would
    # refuse every new pod of the kept cluster's labelled namespaces.
    kubectl delete mutatingwebhookconfiguration/tierwise-demo-inject \
      validatingwebhookconfiguration/tierwise-demo-validate --ignore-not-found >/dev/null
    printf '\n== KEEP=1: the control plane is still running, with everything the demo applied:\n'
    printf '   export KUBECONFIG=%s\n   kubectl get tierwise\n' "$KUBECONFIG"
    printf 'The operator, the webhook and Prometheus stopped with the demo (the webhook configurations are removed,\n'
    printf 'so new pods are created without a sidecar). Run the operator again with:\n'
    printf '   tierwise operator --kubeconfig "$KUBECONFIG" --health-port 18081\n'
    printf 'Stop the control plane with: python hack/localcluster.py down\n'
  else
    python hack/localcluster.py down >/dev/null
  fi
}
trap cleanup EXIT
until curl -fs localhost:18081/readyz >/dev/null; do sleep 0.5; done
echo "operator ready (log: ${TMPDIR:-/tmp}/tierwise-demo-operator.log)"

step "applying examples/quickstart (gold/silver/bronze tiers, two budgets, a cache policy)"
kubectl apply --server-side -f examples/quickstart/
kubectl wait --for=condition=Ready --timeout=90s inferencetier --all
kubectl get tierwise
echo
kubectl get inferencetiers -o wide
echo
kubectl get costbudgets

step "what the operator made of the self-hosted backend (silver/llama-8b): Deployment, Services, PDB, Running pods"
kubectl get deployments,services,poddisruptionbudgets,pods -l tierwise.dev/tier=silver
echo
kubectl get events --field-selector involvedObject.kind=InferenceTier | tail -n 8

step "the Policy ConfigMap the operator wrote for the namespace's sidecars"
kubectl get configmap tierwise-policy -o jsonpath='{.metadata.annotations}{"\n"}'

step "starting the admission webhook (tierwise webhook, a self-signed certificate, on loopback)"
tls="$(mktemp -d)"
tierwise webhook --kubeconfig "$KUBECONFIG" --self-signed 127.0.0.1 --cert-dir "$tls" --host 127.0.0.1 \
  --port 19443 --health-port 18082 --sidecar-image ghcr.io/tierwise/tierwise-sidecar:0.1.0 \
  >"${TMPDIR:-/tmp}/tierwise-demo-webhook.log" 2>&1 &
webhook_pid=$!
until curl -fs localhost:18082/readyz >/dev/null; do sleep 0.5; done
# The chart renders these with the webhook's Service; without kube-proxy here, the API server
# calls the loopback address instead. Same selectors and failure policies as the chart's.
ca="$(base64 -w0 <"$tls/ca-bundle.crt")"
cat <<YAML | kubectl apply -f -
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: tierwise-demo-inject}
webhooks:
  - name: inject.tierwise.dev
    namespaceSelector: {matchLabels: {tierwise.dev/injection: enabled}}
    objectSelector: {matchExpressions: [{key: tierwise.dev/inject, operator: NotIn, values: ["false"]}]}
    rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
    clientConfig: {url: "https://127.0.0.1:19443/mutate", caBundle: "$ca"}
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Fail
    timeoutSeconds: 5
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {name: tierwise-demo-validate}
webhooks:
  - name: validate.tierwise.dev
    rules: [{apiGroups: [tierwise.dev], apiVersions: [v1alpha1], operations: [CREATE, UPDATE], resources: [inferencetiers, costbudgets, cachepolicies]}]
    clientConfig: {url: "https://127.0.0.1:19443/validate", caBundle: "$ca"}
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Ignore
    timeoutSeconds: 5
YAML
sleep 2  # the API server picks up new webhook configurations through its informer

step "a pod created in the labelled namespace comes back with the sidecar and OPENAI_BASE_URL"
cat <<'YAML' | kubectl create -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: my-app, annotations: {tierwise.dev/openai-base-url: "true"}}
spec: {containers: [{name: app, image: example/my-app:1}]}
YAML
kubectl get pod my-app -o jsonpath='{range .spec.initContainers[*]}init (native sidecar): {.name} {.image} restartPolicy={.restartPolicy} runAsNonRoot={.securityContext.runAsNonRoot} readOnlyRootFilesystem={.securityContext.readOnlyRootFilesystem}{"\n"}{end}{range .spec.containers[*]}container: {.name} env={.env}{"\n"}{end}'

step "the validating webhook refuses a fallback cycle (bronze -> gold -> silver -> bronze) at kubectl apply"
refused=$(kubectl apply --server-side -f - 2>&1 <<'YAML' || true
apiVersion: tierwise.dev/v1alpha1
kind: InferenceTier
metadata: {name: bronze}
spec:
  priority: -10
  backends: [{name: gpt-4o-mini, model: gpt-4o-mini, url: "https://api.openai.com/v1", pricing: {inputPerMillion: 0.15, outputPerMillion: 0.6}}]
  fallback: {tier: gold}
YAML
)
echo "$refused"
case "$refused" in *"fallback cycle"*) ;; *) echo "demo: the webhook did not refuse the cycle" >&2; exit 1 ;; esac

step "the API server itself rejects an invalid tier (it falls back to itself)"
cat <<'YAML' | kubectl apply --server-side -f - || true
apiVersion: tierwise.dev/v1alpha1
kind: InferenceTier
metadata: {name: loop}
spec:
  backends: [{name: a, model: m, url: "http://127.0.0.1:9/v1", pricing: {inputPerMillion: 1, outputPerMillion: 1}}]
  fallback: {tier: loop}
YAML

step "kubectl explain documents every field"
kubectl explain inferencetier.spec.routing.costAware

python hack/demo_cluster.py --prometheus "$PROM_URL" --metrics-port "$metrics_port" --workdir "$out/cluster"

step "the Policy the sidecars of namespace default will enforce, compiled from what the cluster holds"
compiled="${TMPDIR:-/tmp}/tierwise-demo-policy.yaml"
kubectl get tierwise -o yaml | tierwise compile - --namespace default >"$compiled"
python hack/policy_summary.py "$compiled"
echo "the whole Policy: $compiled (tierwise compile examples/quickstart prints the same from the files)"

step "summary"
echo "replay: the table above; report $out/replay/report.json; plots $out/replay/*.png"
echo "cluster: CRDs, operator, quickstart objects and their status, sidecar injection and cross-object validation;"
echo "  namespace shop: traffic through the injected sidecar, openai-4o drained on an SLO breach, tenant promo-bot's"
echo "  budget through Notify, Downgrade and Reject, the dashboard's queries answered (logs: $out/cluster)"
