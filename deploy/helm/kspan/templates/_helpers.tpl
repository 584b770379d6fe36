{{/* The release's full name: "kspan" for a release called kspan, else "<release>-kspan". */}}
{{- define "kspan.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kspan.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kspan.labels" -}}
{{ include "kspan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kspan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kspan.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The metrics port: the port of config.prometheus.address, which kspan listens on. */}}
{{- define "kspan.metricsPort" -}}
{{- $config := .Values.config | default dict -}}
{{- $prometheus := $config.prometheus | default dict -}}
{{- $address := required "config.prometheus.address must be set (e.g. \"0.0.0.0:9464\"): the probes and the Prometheus scrape use it" $prometheus.address -}}
{{- $port := splitList ":" $address | last -}}
{{- if not (regexMatch "^[0-9]+$" $port) -}}
{{- fail (printf "config.prometheus.address %q has no port: write ADDRESS:PORT, e.g. \"0.0.0.0:9464\"" $address) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* OTEL_EXPORTER_OTLP_ENDPOINT: otlp.endpoint, or the node-local collector through NODE_IP. */}}
{{- define "kspan.otlpEndpoint" -}}
{{- if .Values.otlp.endpoint -}}
{{- .Values.otlp.endpoint -}}
{{- else if eq .Values.otlp.protocol "grpc" -}}
http://$(NODE_IP):4317
{{- else -}}
http://$(NODE_IP):4318
{{- end -}}
{{- end -}}
