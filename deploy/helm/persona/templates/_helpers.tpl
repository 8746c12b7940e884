{{/* Names, labels and shared values of the persona chart. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "persona.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart> (or fullnameOverride), at most 63 characters; the release name alone when it already
contains the chart name. */}}
{{- define "persona.fullname" -}}
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

{{/* The Triton Deployment/Service name. */}}
{{- define "persona.tritonName" -}}
{{- printf "%s-triton" (include "persona.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* chart-version label value. */}}
{{- define "persona.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "persona.labels" -}}
helm.sh/chart: {{ include "persona.chart" . }}
app.kubernetes.io/name: {{ include "persona.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: persona
{{- end }}

{{/* Selector labels of one component: include "persona.selectorLabels" (dict "ctx" $ "component" "server"). */}}
{{- define "persona.selectorLabels" -}}
app.kubernetes.io/name: {{ include "persona.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The ServiceAccount the persona pod runs as. */}}
{{- define "persona.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "persona.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret whose keys become the persona pod's environment. */}}
{{- define "persona.secretName" -}}
{{- default (include "persona.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{/* PVC names. */}}
{{- define "persona.dataClaim" -}}
{{- default (printf "%s-data" (include "persona.fullname" .)) .Values.persistence.data.existingClaim }}
{{- end }}
{{- define "persona.modelsClaim" -}}
{{- default (printf "%s-models" (include "persona.fullname" .)) .Values.persistence.models.existingClaim }}
{{- end }}

{{/* image reference: include "persona.image" (dict "image" .Values.persona.image "ctx" $). */}}
{{- define "persona.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* gRPC HOST:PORT of Triton for PERSONA_TRITON_URL. */}}
{{- define "persona.tritonUrl" -}}
{{- if .Values.triton.enabled }}
{{- printf "%s:%d" (include "persona.tritonName" .) (int .Values.triton.ports.grpc) }}
{{- else }}
{{- .Values.triton.externalUrl }}
{{- end }}
{{- end }}

{{/* Settings the chart cannot express in values.schema.json; rendering stops with a message naming the value. */}}
{{- define "persona.validate" -}}
{{- if gt (int .Values.persona.replicas) 1 }}
{{- fail "`persona.replicas` > 1 needs Postgres metadata (`database.postgresDsn`), which is planned but not implemented in persona yet: keep persona.replicas: 1 (SQLite) and scale Triton instead (triton.autoscaling)" }}
{{- end }}
{{- if and (eq .Values.persona.engine "triton") (not .Values.triton.enabled) (not .Values.triton.externalUrl) }}
{{- fail "`persona.engine: triton` needs `triton.enabled: true` or `triton.externalUrl: HOST:PORT`" }}
{{- end }}
{{- if and .Values.triton.autoscaling.enabled (lt (int .Values.triton.autoscaling.maxReplicas) (int .Values.triton.autoscaling.minReplicas)) }}
{{- fail "`triton.autoscaling.maxReplicas` must be >= `triton.autoscaling.minReplicas`" }}
{{- end }}
{{- end }}
