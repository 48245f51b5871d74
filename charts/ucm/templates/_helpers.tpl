{{/*
Names and labels shared by every template. Kept in one place so the Deployment's selector, the
Service's selector and the RBAC subjects can never disagree.
*/}}

{{- define "ucm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ucm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's objects: Deployment, Service, Role, ... */}}
{{- define "ucm.operatorName" -}}
{{- printf "%s-operator" (include "ucm.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Cluster-scoped objects carry the release namespace so two namespaced installs do not collide. */}}
{{- define "ucm.clusterObjectName" -}}
{{- printf "%s-%s" (include "ucm.operatorName" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ucm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ucm.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false (the operator must run as an existing ServiceAccount)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespace whose UCMClusters the operator reconciles (unused when watching all namespaces). */}}
{{- define "ucm.watchNamespace" -}}
{{- default .Release.Namespace .Values.watch.namespace -}}
{{- end -}}

{{- define "ucm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ucm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "ucm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ucm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ucm
{{- end -}}

{{- define "ucm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ucm.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) -}}
{{- end -}}

{{- define "ucm.routerImage" -}}
{{- printf "%s:%s" .Values.routerImage.repository (default .Chart.AppVersion .Values.routerImage.tag) -}}
{{- end -}}

{{/*
The operator's RBAC rules, read from files/operator-rbac.yaml: the one place they are declared
(the operator's e2e tests run it under exactly these rules). Renders a YAML map
{rules: [...], clusterRules: [...]}: `rules` apply in the watched namespace (or cluster-wide when
watching all namespaces); `clusterRules` are for cluster-scoped resources and always need a
ClusterRole. The file may be either such a map or a bare list of rules.
*/}}
{{- define "ucm.rbacRules" -}}
{{- $path := "files/operator-rbac.yaml" -}}
{{- $raw := .Files.Get $path -}}
{{- if not $raw -}}
{{- fail (printf "%s is missing or empty: it must list the operator's RBAC rules" $path) -}}
{{- end -}}
{{- $doc := fromYaml $raw -}}
{{- $rules := list -}}
{{- $clusterRules := list -}}
{{- if hasKey $doc "Error" -}}
{{- $rules = fromYamlArray $raw -}}
{{- if and (eq (len $rules) 1) (kindIs "string" (index $rules 0)) -}}
{{- fail (printf "%s is not valid YAML: %s" $path (index $rules 0)) -}}
{{- end -}}
{{- else -}}
{{- if not (hasKey $doc "rules") -}}
{{- fail (printf "%s must be a list of PolicyRules or a map with a 'rules' list (found keys: %s)" $path (keys $doc | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $rules = $doc.rules | default list -}}
{{- $clusterRules = $doc.clusterRules | default list -}}
{{- end -}}
{{- range $i, $r := concat $rules $clusterRules -}}
{{- if not (kindIs "map" $r) -}}
{{- fail (printf "%s: rule %d is not a map with apiGroups/resources/verbs" $path $i) -}}
{{- end -}}
{{- if or (has "*" ($r.verbs | default list)) (has "*" ($r.resources | default list)) (has "*" ($r.apiGroups | default list)) -}}
{{- fail (printf "%s: rule %d uses a '*' wildcard; the operator's rules must name exact groups, resources and verbs" $path $i) -}}
{{- end -}}
{{- end -}}
{{- dict "rules" $rules "clusterRules" $clusterRules | toYaml -}}
{{- end -}}
