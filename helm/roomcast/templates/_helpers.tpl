{{/* Chart name. */}}
{{- define "roomcast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "roomcast.fullname" -}}
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

{{- define "roomcast.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "roomcast.labels" -}}
helm.sh/chart: {{ include "roomcast.chart" . }}
{{ include "roomcast.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: edge
{{- end }}

{{- define "roomcast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "roomcast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "roomcast.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "roomcast.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "roomcast.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* The Secret with the JWT secret / public key and the API keys. */}}
{{- define "roomcast.authSecretName" -}}
{{- default (printf "%s-auth" (include "roomcast.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* The Secret with the Redis password ("" when there is none). */}}
{{- define "roomcast.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else if .Values.redis.password }}
{{- printf "%s-redis" (include "roomcast.fullname" .) }}
{{- end }}
{{- end }}

{{- define "roomcast.algorithm" -}}
{{- $auth := .Values.config.auth | default dict }}
{{- upper (get $auth "algorithm" | default "HS256") }}
{{- end }}

{{/*
A Redis URL with credentials from the environment: redis://user:$(ROOMCAST_REDIS_PASSWORD)@host:port.
Kubernetes expands $(VAR) from variables defined earlier in the container's env.
*/}}
{{- define "roomcast.redisUrl" -}}
{{- $url := .url }}
{{- if .withPassword }}
{{- regexReplaceAll "^(rediss?)://" $url (printf "${1}://%s:$$(ROOMCAST_REDIS_PASSWORD)@" .username) }}
{{- else if .username }}
{{- regexReplaceAll "^(rediss?)://" $url (printf "${1}://%s@" .username) }}
{{- else }}
{{- $url }}
{{- end }}
{{- end }}

{{/* drain_window in whole seconds (rounded up). */}}
{{- define "roomcast.drainSeconds" -}}
{{- $d := toString (get (.Values.config | default dict) "drain_window" | default "10s") }}
{{- if hasSuffix "ms" $d }}
{{- div (add (trimSuffix "ms" $d | atoi) 999) 1000 }}
{{- else if hasSuffix "s" $d }}
{{- trimSuffix "s" $d | atoi }}
{{- else if hasSuffix "m" $d }}
{{- mul (trimSuffix "m" $d | atoi) 60 }}
{{- else }}
{{- fail (printf "config.drain_window %q: use whole seconds (\"10s\"), minutes (\"1m\") or milliseconds (\"500ms\")" $d) }}
{{- end }}
{{- end }}

{{/* preStop sleep + drain_window + the node's 5 s close wait + 5 s margin. */}}
{{- define "roomcast.terminationGracePeriodSeconds" -}}
{{- $min := add .Values.lifecycle.preStopSleepSeconds (include "roomcast.drainSeconds" . | atoi) 5 5 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $min }}
{{- else if lt (int .Values.terminationGracePeriodSeconds) (int $min) }}
{{- fail (printf "terminationGracePeriodSeconds %v is shorter than preStopSleepSeconds + drain_window + 10 = %d: sockets would be killed mid-drain" .Values.terminationGracePeriodSeconds $min) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* One TOML value: integers without ".0", strings and arrays as JSON (valid TOML). */}}
{{- define "roomcast.tomlValue" -}}
{{- if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "bool" .) }}
{{- . }}
{{- else if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}{{ $items = append $items (include "roomcast.tomlValue" .) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else }}
{{- fail (printf "config: cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* A TOML key: bare when it can be, else quoted. */}}
{{- define "roomcast.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* One TOML table (dict "map" M "prefix" "a.b"): its keys, then its sub-tables. */}}
{{- define "roomcast.tomlTable" -}}
{{- $map := .map }}
{{- $prefix := .prefix }}
{{- range $key := keys $map | sortAlpha }}
{{- $value := get $map $key }}
{{- if not (kindIs "map" $value) }}
{{ include "roomcast.tomlKey" $key }} = {{ include "roomcast.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key := keys $map | sortAlpha }}
{{- $value := get $map $key }}
{{- if kindIs "map" $value }}
{{- $name := include "roomcast.tomlKey" $key }}
{{- if $prefix }}{{ $name = printf "%s.%s" $prefix $name }}{{ end }}

[{{ $name }}]
{{- include "roomcast.tomlTable" (dict "map" $value "prefix" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* `config` as a TOML document. */}}
{{- define "roomcast.toml" -}}
{{- include "roomcast.tomlTable" (dict "map" (.Values.config | default dict) "prefix" "") }}
{{- end }}
