{{/*
Chart name, cut to the 63-character limit of label values.
*/}}
{{- define "graft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources.
*/}}
{{- define "graft.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "graft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the operator pod; never change them on upgrade (selectors are immutable).
*/}}
{{- define "graft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "graft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Standard labels of every resource the chart renders.
*/}}
{{- define "graft.labels" -}}
helm.sh/chart: {{ include "graft.chart" . }}
{{ include "graft.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: graft
{{- end }}

{{- define "graft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "graft.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "graft.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Namespace that holds namespaced RBAC: the watched namespace in single-namespace mode.
*/}}
{{- define "graft.rbacNamespace" -}}
{{- default .Release.Namespace .Values.watchNamespace }}
{{- end }}

{{/*
Rules the operator needs inside the namespaces it watches. Used by the ClusterRole in
cluster-wide mode and by the Role in single-namespace mode.
*/}}
{{- define "graft.namespacedRules" -}}
# Exactly the calls of graft/kube.py and Kopf (tests/chart/test_rbac.py compares them).
- apiGroups: ["graft.dev"]
  resources: ["finetunejobs", "modelservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["graft.dev"]
  resources: ["finetunejobs/status", "modelservices/status"]
  verbs: ["patch"]
- apiGroups: ["graft.dev"]
  resources: ["finetunejobs/finalizers", "modelservices/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
# server-side apply (create + patch); delete takes back what a refused job had made
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["create", "patch", "delete"]
# get: a started job's recorded spec
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "delete"]
# each job's progress Lease (the operator watches it, and must hold the verbs the
# trainer's Role grants on it) and the NetworkPolicy around its gang
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
# each job's trainer identity: a Role that lets its ranks update only the job's Lease
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
# each ModelService's Ray token (created once, never read back) and NetworkPolicy; get:
# the API-key Secret a ModelService names, to say on it when the Secret or key is missing
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}
