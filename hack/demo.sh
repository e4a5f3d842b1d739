#!/usr/bin/env bash
# The demo, from a fresh clone: set-up, a local control plane, the CRDs, the quickstart tiers,
# budgets and cache policy, what kubectl shows of them, an invalid object the API server
# refuses, and the Policy they compile to. KEEP=1 leaves the control plane running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

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

step "starting the operator (tierwise operator, out of cluster, with the same kubeconfig)"
kubectl label namespace default tierwise.dev/injection=enabled --overwrite
tierwise operator --kubeconfig "$KUBECONFIG" --health-port 18081 >"${TMPDIR:-/tmp}/tierwise-demo-operator.log" 2>&1 &
operator_pid=$!
trap 'kill $operator_pid 2>/dev/null; wait $operator_pid 2>/dev/null; [ "${KEEP:-0}" = 1 ] || python hack/localcluster.py down >/dev/null' EXIT
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

step "the Policy the sidecars of namespace default will enforce, compiled from what the cluster holds"
kubectl get tierwise -o yaml | tierwise compile - --namespace default | head -n 60
echo "... (tierwise compile examples/quickstart prints the same Policy from the files)"
