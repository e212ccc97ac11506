{{/* Names and labels. */}}
{{- define "ks.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ks.fullname" -}}
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

{{- define "ks.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ks.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubesentiment
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include "ks.selector" (list . "api") */}}
{{- define "ks.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "ks.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "ks.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ks.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of `make containerize`; the onnx flavour (no torch) is tagged <version>-onnx. */}}
{{- define "ks.image" -}}
{{- $suffix := ternary "-onnx" "" (eq .Values.image.flavor "onnx") -}}
{{- printf "%s:%s%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) $suffix -}}
{{- end -}}

{{/* The pod needs its service-account token only to log in to Vault (hvac or the agent). */}}
{{- define "ks.needsToken" -}}
{{- if has .Values.secrets.source (list "vault" "vault-agent") }}true{{ else }}false{{ end -}}
{{- end -}}

{{/* Whether JOBS_DATABASE_URL comes from Vault (hvac or the agent) rather than a Secret. */}}
{{- define "ks.dbFromVault" -}}
{{- if and (has .Values.secrets.source (list "vault" "vault-agent")) .Values.secrets.vault.jobsDatabasePath }}true{{ else }}false{{ end -}}
{{- end -}}

{{- define "ks.jobsDatabaseSecret" -}}
{{- default .Values.secrets.existingSecret .Values.jobsDatabase.postgresql.existingSecret -}}
{{- end -}}

{{/* Fail early on combinations the service itself would refuse. */}}
{{- define "ks.validate" -}}
{{- if and (eq .Values.image.flavor "onnx") (eq .Values.config.BACKEND "pytorch") -}}
{{- fail "image.flavor=onnx has no torch: BACKEND=pytorch needs image.flavor=full" -}}
{{- end -}}
{{- if and .Values.api.enabled (eq .Values.jobsDatabase.type "sqlite") -}}
{{- if or (gt (int .Values.api.replicas) 1) .Values.api.autoscaling.enabled -}}
{{- fail "jobsDatabase.type=sqlite allows exactly one API replica (no autoscaling): use postgresql for more" -}}
{{- end -}}
{{- end -}}
{{- if and (ne .Values.worker.autoscaling.mode "none") (gt (int .Values.worker.autoscaling.maxReplicas) (int .Values.worker.partitions)) -}}
{{- fail "worker.autoscaling.maxReplicas must not exceed worker.partitions" -}}
{{- end -}}
{{- with .Values.jobsDatabase.postgresql.tls -}}
{{- if and (has .mode (list "verify-ca" "verify-full")) (not .caSecret) -}}
{{- fail "jobsDatabase.postgresql.tls.mode=verify-* needs tls.caSecret (a Secret with ca.crt): the CA that signed the server's certificate" -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.jobsDatabase.type "postgresql") (eq (include "ks.dbFromVault" .) "false") (not (include "ks.jobsDatabaseSecret" .)) -}}
{{- fail "jobsDatabase.type=postgresql needs jobsDatabase.postgresql.existingSecret (or secrets.existingSecret), or Vault with secrets.vault.jobsDatabasePath" -}}
{{- end -}}
{{- end -}}

{{/* Environment common to both containers: include "ks.env" (list . "api") */}}
{{- define "ks.env" -}}
{{- $ := index . 0 -}}
{{- $component := index . 1 -}}
{{- $v := $.Values -}}
- name: API_AUTH
  value: {{ $v.auth.enabled | quote }}
- name: TMPDIR
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: BENTOML_HOME
  value: /var/lib/bentoml
{{- if eq $component "worker" }}
# The worker imports its modules from the Bento's src/ (not installed as a package).
- name: PYTHONPATH
  value: /home/bentoml/bento/src
- name: WORKER_PORT
  value: {{ $v.worker.port | quote }}
{{- end }}
{{- if eq $component "api" }}
- name: JOBS_DB
  value: /var/lib/kubesentiment/jobs.db
{{- with $v.jobsDatabase.postgresql.tls }}
{{- if and (eq $v.jobsDatabase.type "postgresql") .mode }}
- name: JOBS_DATABASE_SSLMODE
  value: {{ .mode | quote }}
{{- end }}
{{- if and (eq $v.jobsDatabase.type "postgresql") .caSecret }}
- name: JOBS_DATABASE_SSLROOTCERT
  value: /etc/jobs-database-ca/ca.crt
{{- end }}
{{- end }}
{{- end }}
{{- if eq $v.secrets.source "kubernetes" }}
- name: API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.existingSecret }}
      key: {{ $v.secrets.keys.apiKeys }}
      optional: {{ not $v.auth.enabled }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.existingSecret }}
      key: {{ $v.secrets.keys.kafkaSaslPassword }}
      optional: true
{{- end }}
{{- if and (eq $component "api") (eq $v.jobsDatabase.type "postgresql") (eq (include "ks.dbFromVault" $) "false") }}
- name: JOBS_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ks.jobsDatabaseSecret" $ }}
      key: {{ $v.jobsDatabase.postgresql.key }}
{{- end }}
{{- if eq $v.secrets.source "vault" }}
- name: VAULT_ADDR
  value: {{ $v.secrets.vault.addr | quote }}
- name: VAULT_AUTH_METHOD
  value: kubernetes
- name: VAULT_KUBERNETES_ROLE
  value: {{ $v.secrets.vault.role | quote }}
{{- with $v.secrets.vault.authMount }}
- name: VAULT_AUTH_MOUNT
  value: {{ . | quote }}
{{- end }}
- name: VAULT_KV_MOUNT
  value: {{ $v.secrets.vault.kvMount | quote }}
- name: VAULT_API_KEYS_PATH
  value: {{ $v.secrets.vault.apiKeysPath | quote }}
{{- with $v.secrets.vault.kafkaPath }}
- name: VAULT_KAFKA_PATH
  value: {{ . | quote }}
{{- end }}
{{- if and (eq $v.jobsDatabase.type "postgresql") $v.secrets.vault.jobsDatabasePath }}
- name: VAULT_JOBS_DATABASE_PATH
  value: {{ $v.secrets.vault.jobsDatabasePath | quote }}
{{- end }}
- name: VAULT_REFRESH
  value: {{ $v.secrets.vault.refresh | quote }}
- name: VAULT_MAX_STALE
  value: {{ $v.secrets.vault.maxStale | quote }}
{{- if $v.secrets.vault.caSecret }}
- name: VAULT_CACERT
  value: /etc/vault-ca/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* Container command: with the Vault Agent the rendered env file is sourced first. */}}
{{- define "ks.command" -}}
{{- $ := index . 0 -}}
{{- $args := index . 1 -}}
{{- if eq $.Values.secrets.source "vault-agent" }}
command: ["/bin/sh", "-c", ". /vault/secrets/env && exec /home/bentoml/bento/env/docker/entrypoint.sh \"$@\"", "--"]
{{- end }}
args: {{ toJson $args }}
{{- end -}}

{{- define "ks.vaultAgentAnnotations" -}}
{{- $v := .Values.secrets.vault -}}
{{- if eq .Values.secrets.source "vault-agent" }}
vault.hashicorp.com/agent-inject: "true"
vault.hashicorp.com/role: {{ $v.role | quote }}
vault.hashicorp.com/agent-pre-populate-only: {{ $v.agent.prePopulateOnly | quote }}
{{- with $v.authMount }}
vault.hashicorp.com/auth-path: {{ printf "auth/%s" . | quote }}
{{- end }}
{{- if $v.caSecret }}
vault.hashicorp.com/tls-secret: {{ $v.caSecret | quote }}
vault.hashicorp.com/ca-cert: /vault/tls/ca.crt
{{- end }}
vault.hashicorp.com/agent-inject-secret-env: {{ printf "%s/data/%s" $v.kvMount $v.apiKeysPath | quote }}
vault.hashicorp.com/agent-inject-template-env: |
  {{ printf "{{- with secret \"%s/data/%s\" }}" $v.kvMount $v.apiKeysPath }}
  export API_KEYS="{{ "{{" }} range $k, $v := .Data.data {{ "}}" }}{{ "{{" }} $k {{ "}}" }}:{{ "{{" }} $v {{ "}}" }},{{ "{{" }} end {{ "}}" }}"
  {{ "{{-" }} end {{ "}}" }}
  {{- with $v.kafkaPath }}
  {{ printf "{{- with secret \"%s/data/%s\" }}" $v.kvMount . }}
  export KAFKA_SASL_USERNAME="{{ "{{" }} .Data.data.username {{ "}}" }}"
  export KAFKA_SASL_PASSWORD="{{ "{{" }} .Data.data.password {{ "}}" }}"
  {{ "{{-" }} end {{ "}}" }}
  {{- end }}
  {{- if and (eq .Values.jobsDatabase.type "postgresql") $v.jobsDatabasePath }}
  {{ printf "{{- with secret \"%s/data/%s\" }}" $v.kvMount $v.jobsDatabasePath }}
  export JOBS_DATABASE_URL="{{ "{{" }} .Data.data.url {{ "}}" }}"
  {{ "{{-" }} end {{ "}}" }}
  {{- end }}
{{- with $v.agent.annotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Hardened pod-level fields, volumes and topology: include "ks.podSpec" (list . "api" $values) */}}
{{- define "ks.topology" -}}
{{- $ := index . 0 -}}
{{- $component := index . 1 -}}
{{- $w := index . 2 -}}
{{- if $w.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $w.topologySpread.zoneSkew }}
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: {{ $w.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "ks.selector" (list $ $component) | nindent 8 }}
  - maxSkew: {{ $w.topologySpread.nodeSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ $w.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "ks.selector" (list $ $component) | nindent 8 }}
{{- end }}
{{- with $w.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "ks.probes" -}}
{{- $w := index . 0 -}}
{{- $port := index . 1 -}}
{{- /* The API starts when ready (model loaded); the worker when alive: its /readyz also
       waits for Kafka, and an unreachable broker must not restart it. */ -}}
startupProbe:
  httpGet: {path: {{ index . 2 }}, port: {{ $port }}}
  {{- toYaml $w.probes.startup | nindent 2 }}
livenessProbe:
  httpGet: {path: /livez, port: {{ $port }}}
  {{- toYaml $w.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: {{ $port }}}
  {{- toYaml $w.probes.readiness | nindent 2 }}
{{- end -}}

{{- define "ks.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: bentoml-home
  mountPath: /var/lib/bentoml
{{- if .Values.secrets.vault.caSecret }}
- name: vault-ca
  mountPath: /etc/vault-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "ks.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: bentoml-home
  emptyDir:
    sizeLimit: {{ .Values.scratch.bentomlHomeSizeLimit }}
{{- if .Values.secrets.vault.caSecret }}
- name: vault-ca
  secret:
    secretName: {{ .Values.secrets.vault.caSecret }}
{{- end }}
{{- end -}}
