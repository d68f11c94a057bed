{{/* Chart name. */}}
{{- define "gitproxy-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release-scoped). */}}
{{- define "gitproxy-broker.fullname" -}}
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
{{- define "gitproxy-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gitproxy-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "gitproxy-broker.labels" -}}
app: gitproxy-broker
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gitproxy-broker.selectorLabels" . }}
app.kubernetes.io/component: broker
app.kubernetes.io/part-of: gitproxy
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Fails rendering with a clear message when a required value is missing. */}}
{{- define "gitproxy-broker.validate" -}}
{{- if and (not .Values.config.existingSecret) (not .Values.config.apiKeysSha256) }}
{{- fail "config.apiKeysSha256 must hold at least one API key hash: the api listener binds 0.0.0.0:8080, which the broker refuses without an API key (gitproxy-broker keygen prints a key and its hash)" }}
{{- end }}
{{- if and (not .Values.redis.url) (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) }}
{{- fail "several replicas need cluster mode: set redis.url (and cluster.peerSecret and cluster.storeKey, or cluster.existingSecret); without it keep replicaCount: 1 and autoscaling off" }}
{{- end }}
{{- if .Values.redis.url }}
{{- if not (or .Values.cluster.existingSecret (and .Values.cluster.peerSecret .Values.cluster.storeKey)) }}
{{- fail "cluster mode (redis.url) needs cluster.existingSecret, or cluster.peerSecret and cluster.storeKey" }}
{{- end }}
{{- if and .Values.redis.existingSecret .Values.redis.password }}
{{- fail "set either redis.existingSecret or redis.password, not both" }}
{{- end }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- if and .Values.tls.existingSecret (or .Values.tls.cert .Values.tls.key) }}
{{- fail "set either tls.existingSecret or tls.cert/tls.key, not both" }}
{{- end }}
{{- if not (or .Values.tls.existingSecret (and .Values.tls.cert .Values.tls.key)) }}
{{- fail "the agent listener needs TLS: set tls.existingSecret (a kubernetes.io/tls Secret) or tls.cert and tls.key (PEM), or tls.enabled=false behind a TLS-terminating load balancer" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret holding the TOML file, and its key. */}}
{{- define "gitproxy-broker.configSecret" -}}
{{- if .Values.config.existingSecret }}{{ .Values.config.existingSecret }}{{ else }}{{ include "gitproxy-broker.fullname" . }}-config{{ end }}
{{- end }}
{{- define "gitproxy-broker.configKey" -}}
{{- if .Values.config.existingSecret }}{{ .Values.config.existingSecretKey }}{{ else }}broker.toml{{ end }}
{{- end }}
{{- define "gitproxy-broker.tlsSecret" -}}
{{- if .Values.tls.existingSecret }}{{ .Values.tls.existingSecret }}{{ else }}{{ include "gitproxy-broker.fullname" . }}-tls{{ end }}
{{- end }}

{{/* The broker's TOML file (strings are JSON-quoted, which TOML accepts). */}}
{{- define "gitproxy-broker.toml" -}}
# Rendered by the gitproxy-broker Helm chart.
api_keys_sha256 = [{{ range $i, $k := .Values.config.apiKeysSha256 }}{{ if $i }}, {{ end }}{{ $k | toString | lower | toJson }}{{ end }}]
{{- range .Values.config.connections }}

[[connection]]
id = {{ .id | toJson }}
mode = {{ .mode | toJson }}
gitlab_url = {{ .gitlabUrl | toJson }}
{{- with .externalUrl }}
external_url = {{ . | toJson }}
{{- end }}
{{- with .token }}
token = {{ . | toJson }}
{{- end }}
{{- with .tokenFile }}
token_file = {{ . | toJson }}
{{- end }}
{{- with .accessKeySha256 }}
access_key_sha256 = {{ . | toString | lower | toJson }}
{{- end }}
{{- end }}
{{ end }}

{{/* The Secret holding the cluster's peer secret and store key. */}}
{{- define "gitproxy-broker.clusterSecret" -}}
{{- .Values.cluster.existingSecret | default (printf "%s-cluster" (include "gitproxy-broker.fullname" .)) }}
{{- end }}

{{/* The Secret holding the Redis password, if any. */}}
{{- define "gitproxy-broker.redisSecret" -}}
{{- .Values.redis.existingSecret | default (printf "%s-cluster" (include "gitproxy-broker.fullname" .)) }}
{{- end }}
