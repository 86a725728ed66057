{{/* Names, labels and the small decisions every template shares. */}}

{{- define "tilehopper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tilehopper.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "tilehopper.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "tilehopper.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "tilehopper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; pass a dict with "root" and "component". */}}
{{- define "tilehopper.labels" -}}
helm.sh/chart: {{ include "tilehopper.chart" .root }}
{{ include "tilehopper.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tilehopper
{{- end }}

{{- define "tilehopper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tilehopper.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tilehopper.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tilehopper.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "tilehopper.fullname" .)) .Values.serviceAccounts.operator.name }}
{{- end }}

{{/* Namespaces whose TileJobs this release serves, comma-separated: its own first. */}}
{{- define "tilehopper.jobNamespaces" -}}
{{- prepend .Values.jobs.namespaces .Release.Namespace | uniq | join "," }}
{{- end }}

{{- define "tilehopper.bundledRabbitmq" -}}
{{- if not (or .Values.rabbitmq.external.url .Values.rabbitmq.external.existingSecret) }}true{{ end }}
{{- end }}

{{/* The Secret holding the AMQP url and management apiUrl (keys url, apiUrl). */}}
{{- define "tilehopper.amqpSecret" -}}
{{- default (printf "%s-amqp" (include "tilehopper.fullname" .)) .Values.rabbitmq.external.existingSecret }}
{{- end }}

{{- define "tilehopper.rabbitmqService" -}}
{{- printf "%s-rabbitmq" (include "tilehopper.fullname" .) }}
{{- end }}

{{/* The Secret with the operator's AWS keys, or nothing when it uses a role or the default chain. */}}
{{- define "tilehopper.awsSecret" -}}
{{- if .Values.aws.existingSecret }}
{{- .Values.aws.existingSecret }}
{{- else if .Values.aws.accessKeyId }}
{{- printf "%s-aws" (include "tilehopper.fullname" .) }}
{{- end }}
{{- end }}

{{- define "tilehopper.tilesClaim" -}}
{{- default (printf "%s-tiles" (include "tilehopper.fullname" .)) .Values.tiles.pvc.existingClaim }}
{{- end }}

{{/* Non-root, read-only, no capabilities: the container half of every pod the chart runs. */}}
{{- define "tilehopper.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}
