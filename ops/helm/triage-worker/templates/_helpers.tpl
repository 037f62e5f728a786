{{- define "triage.labels" -}}
app.kubernetes.io/name: triage-worker
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "triage.selector" -}}
app.kubernetes.io/name: triage-worker
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The pod spec shared by every component; call with (dict "root" $ "args" list "extra" dict). */}}
{{- define "triage.container" -}}
image: "{{ .root.Values.image.repository }}:{{ .root.Values.image.tag }}"
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
args: {{ toJson .args }}
env:
  - name: TRIAGE_CONFIG
    value: /etc/triage/triage.yaml
  - name: TRIAGE_DATABASE__URL
    valueFrom:
      secretKeyRef: {name: {{ .root.Values.secrets.databaseUrl.name }}, key: {{ .root.Values.secrets.databaseUrl.key }}}
  - name: TRIAGE_BROKER__URL
    value: {{ .root.Values.redis.url | quote }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
volumeMounts:
  - {name: config, mountPath: /etc/triage, readOnly: true}
  - {name: secret-files, mountPath: /var/lib/triage/secrets, readOnly: true}
  - {name: data, mountPath: /var/lib/triage}
  - {name: tmp, mountPath: /tmp}
{{- end }}

{{- define "triage.volumes" -}}
volumes:
  - name: config
    configMap: {name: {{ .Release.Name }}-config}
  - name: secret-files
    secret: {secretName: {{ .Values.secrets.files }}, defaultMode: 0400}
  - name: data
    persistentVolumeClaim: {claimName: {{ .Values.storage.claimName }}}
  - name: tmp
    emptyDir: {}
{{- end }}
