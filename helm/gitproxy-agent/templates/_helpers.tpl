{{/* Chart name. */}}
{{- define "gitproxy-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release-scoped). */}}
{{- define "gitproxy-agent.fullname" -}}
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

{{/* Selector labels (stable across upgrades). */}}
{{- define "gitproxy-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gitproxy-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "gitproxy-agent.labels" -}}
app: gitproxy
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gitproxy-agent.selectorLabels" . }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: gitproxy
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* proxy.noProxy (a list or a comma string) as one comma string. */}}
{{- define "gitproxy-agent.noProxy" -}}
{{- $np := .Values.proxy.noProxy -}}
{{- $items := list -}}
{{- if kindIs "slice" $np -}}
{{- range $np }}{{- $items = append $items (toString . | trim) }}{{- end -}}
{{- else if $np -}}
{{- range (splitList "," (toString $np)) }}{{- $items = append $items (trim .) }}{{- end -}}
{{- end -}}
{{- $items = without $items "" -}}
{{- join "," $items -}}
{{- end }}

{{/* The Secret holding the accessKey (the chart's own, or existingSecret). */}}
{{- define "gitproxy-agent.accessKeySecret" -}}
{{- if .Values.gitproxy.existingSecret }}{{ .Values.gitproxy.existingSecret }}{{ else }}{{ include "gitproxy-agent.fullname" . }}{{ end }}
{{- end }}
{{- define "gitproxy-agent.accessKeyKey" -}}
{{- if .Values.gitproxy.existingSecret }}{{ .Values.gitproxy.existingSecretKey }}{{ else }}accessKey{{ end }}
{{- end }}

{{/* Whether the agent holds its own GitLab token, and where. */}}
{{- define "gitproxy-agent.hasToken" -}}
{{- if or .Values.gitproxy.gitlabToken .Values.gitproxy.gitlabTokenExistingSecret }}true{{ end }}
{{- end }}
{{- define "gitproxy-agent.tokenSecret" -}}
{{- if .Values.gitproxy.gitlabTokenExistingSecret }}{{ .Values.gitproxy.gitlabTokenExistingSecret }}{{ else }}{{ include "gitproxy-agent.fullname" . }}{{ end }}
{{- end }}
{{- define "gitproxy-agent.tokenKey" -}}
{{- if .Values.gitproxy.gitlabTokenExistingSecret }}{{ .Values.gitproxy.gitlabTokenExistingSecretKey }}{{ else }}gitlabToken{{ end }}
{{- end }}

{{/* Whether this chart renders its own Secret. */}}
{{- define "gitproxy-agent.ownSecret" -}}
{{- if or (not .Values.gitproxy.existingSecret) .Values.gitproxy.gitlabToken .Values.customCaCert }}true{{ end }}
{{- end }}

{{/* Fails rendering with a clear message when a required value is missing. */}}
{{- define "gitproxy-agent.validate" -}}
{{- if not .Values.gitproxy.brokerUrl }}
{{- fail "gitproxy.brokerUrl is required: the broker's agent listener, e.g. --set gitproxy.brokerUrl=https://broker.example.com:8443" }}
{{- end }}
{{- if not (or .Values.gitproxy.gitlabUrl .Values.gitproxy.allowUnpinned) }}
{{- fail "gitproxy.gitlabUrl is required: your GitLab's base URL, e.g. --set gitproxy.gitlabUrl=https://gitlab.corp.example (or --set gitproxy.allowUnpinned=true to use whatever GitLab URL the broker sends)" }}
{{- end }}
{{- if and .Values.gitproxy.accessKey .Values.gitproxy.existingSecret }}
{{- fail "set either gitproxy.accessKey or gitproxy.existingSecret, not both" }}
{{- end }}
{{- if not (or .Values.gitproxy.accessKey .Values.gitproxy.existingSecret) }}
{{- fail "gitproxy.accessKey (or gitproxy.existingSecret) is required: --set gitproxy.accessKey=<the key from gitproxy-broker keygen>" }}
{{- end }}
{{- if and .Values.gitproxy.gitlabToken .Values.gitproxy.gitlabTokenExistingSecret }}
{{- fail "set either gitproxy.gitlabToken or gitproxy.gitlabTokenExistingSecret, not both" }}
{{- end }}
{{- if .Values.customCaCert }}
{{- if not (contains "-----BEGIN CERTIFICATE-----" (b64dec (nospace .Values.customCaCert))) }}
{{- fail "customCaCert must be a base64-encoded PEM bundle (-----BEGIN CERTIFICATE----- ...): --set-file customCaCert=<(base64 -w0 ca.pem)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Where the secret files are mounted. */}}
{{- define "gitproxy-agent.secretsDir" -}}/etc/gitproxy/secrets{{- end }}
