#!/usr/bin/env bash
# make e2e-kind: the whole system on a real (kind) cluster, with the images built from images/.
#
# Builds the operator and trainer images, creates a kind cluster, loads the images into it,
# installs the chart with helm, generates a tiny model and an instruction set on a PVC
# inside the cluster (nothing downloaded at run time but the base images and packages the
# Dockerfiles install), runs a LoRA SFT FineTuneJob on the CPU pool and waits for it to
# succeed. Skips (exit 0) where Docker or kind is absent. See docs/e2e.md.
#
# Env: GRAFT_KIND_CLUSTER (default graft-e2e), GRAFT_KIND_KEEP=1 keeps the cluster,
#      GRAFT_KIND_TIMEOUT (default 20m) for the job, KIND_NODE_IMAGE (kind's --image).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "skipped: no Docker (make e2e-kind needs a running Docker daemon and kind)"
  exit 0
fi
if ! command -v kind >/dev/null 2>&1; then
  echo "skipped: no kind on PATH (https://kind.sigs.k8s.io/docs/user/quick-start/)"
  exit 0
fi
for tool in kubectl python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "e2e-kind: $tool is required" >&2; exit 1; }
done

cluster="${GRAFT_KIND_CLUSTER:-graft-e2e}"
timeout="${GRAFT_KIND_TIMEOUT:-20m}"
tag="e2e"
ns="graft-e2e"
helm="$(bash hack/install-helm.sh)"
export KUBECONFIG
KUBECONFIG="$(mktemp -t graft-kind-kubeconfig.XXXXXX)"
work="$(mktemp -d -t graft-kind.XXXXXX)"
start=$(date +%s)

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "--- e2e-kind failed; state of the cluster:" >&2
    kubectl get ftj,pods,pvc -A -o wide >&2 || true
    kubectl -n "$ns" describe ftj >&2 || true
    kubectl -n graft-system logs deploy/graft --tail=100 >&2 || true
    kubectl -n "$ns" logs -l graft.dev/job=kind-sft --tail=50 --prefix >&2 || true
  fi
  if [[ "${GRAFT_KIND_KEEP:-0}" != "1" ]]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  else
    echo "kept kind cluster $cluster (KUBECONFIG=$KUBECONFIG)"
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

echo "== building images"
docker build -q -f images/operator/Dockerfile -t "graft-operator:$tag" .
# CPU torch keeps the trainer image small; kind has no GPUs.
docker build -q -f images/trainer/Dockerfile \
  --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t "graft-trainer:$tag" .

echo "== kind cluster $cluster"
if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 180s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
kind get kubeconfig --name "$cluster" >"$KUBECONFIG"
kind load docker-image --name "$cluster" "graft-operator:$tag" "graft-trainer:$tag"

echo "== helm install"
cat >"$work/values.yaml" <<YAML
image: {repository: graft-operator, tag: "$tag", pullPolicy: IfNotPresent}
config:
  nodePools:
    - {name: cpu, nodeSelector: {}, tolerations: [], gpusPerNode: 0, pricePerGpuHour: 0}
  trainerImage: graft-trainer:$tag
  terminationGraceSeconds: 30
YAML
"$helm" upgrade --install graft charts/graft --namespace graft-system --create-namespace \
  -f "$work/values.yaml" --wait --timeout 5m
kubectl -n graft-system rollout status deploy/graft --timeout=180s

echo "== inputs: a tiny model and an instruction set on a PVC"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$ns" apply -f e2e/kind/inputs.yaml
kubectl -n "$ns" wait pod/inputs --for=jsonpath='{.status.phase}'=Succeeded --timeout=10m

echo "== FineTuneJob"
kubectl -n "$ns" apply -f e2e/kind/finetunejob.yaml
kubectl -n "$ns" wait ftj/kind-sft --for=condition=Succeeded --timeout="$timeout"
kubectl -n "$ns" get ftj kind-sft
kubectl -n "$ns" get ftj kind-sft -o jsonpath='{.status.output}{"\n"}'
echo "e2e-kind passed in $(( $(date +%s) - start ))s"
