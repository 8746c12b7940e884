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

{{/* The ServiceAccount the persona pods run as (combined: the persona pod; split: every pod but train). */}}
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

{{/* "true" when Triton runs as a sidecar in every persona pod that draws (triton.placement: sidecar): split's
generate and evaluate pods, or the combined persona pod; else empty. */}}
{{- define "persona.tritonSidecar" -}}
{{- if and .Values.triton.enabled (eq .Values.triton.placement "sidecar") }}true{{ end }}
{{- end }}

{{/* "true" when the chart runs Triton as its own Deployment + Service (+ HPA) (triton.placement: service). */}}
{{- define "persona.tritonService" -}}
{{- if and .Values.triton.enabled (eq .Values.triton.placement "service") }}true{{ end }}
{{- end }}

{{/* "true" when something mounts the models PVC: the persona pods and the Triton Deployment with placement: service
(or an external Triton / the embedded engine, as before); with placement: sidecar every persona pod has its own
emptyDir /models instead, and only the training worker pods of train.dispatcher: kubernetes mount the PVC
(PERSONA_K8S_MODELS_CLAIM). */}}
{{- define "persona.modelsClaimUsed" -}}
{{- if or (not (include "persona.tritonSidecar" .)) (eq .Values.train.dispatcher "kubernetes") }}true{{ end }}
{{- end }}

{{/* gRPC HOST:PORT of Triton for PERSONA_TRITON_URL: the Triton Service, the pod's own sidecar (127.0.0.1), or
triton.externalUrl. */}}
{{- define "persona.tritonUrl" -}}
{{- if include "persona.tritonSidecar" . }}
{{- printf "127.0.0.1:%d" (int .Values.triton.ports.grpc) }}
{{- else if .Values.triton.enabled }}
{{- printf "%s:%d" (include "persona.tritonName" .) (int .Values.triton.ports.grpc) }}
{{- else }}
{{- .Values.triton.externalUrl }}
{{- end }}
{{- end }}

{{/* The services of topology: split, in order, and their gRPC service names (protos/persona/v1). */}}
{{- define "persona.splitServices" -}}
caption mask train generate evaluate
{{- end }}
{{- define "persona.grpcService" -}}
{{- get (dict "caption" "persona.v1.CaptionService" "mask" "persona.v1.MaskService" "train" "persona.v1.TrainService" "generate" "persona.v1.GenerateService" "evaluate" "persona.v1.EvaluateService") . }}
{{- end }}

{{/* Deployment/Service name of one split service: include "persona.serviceName" (dict "ctx" $ "name" "train"). */}}
{{- define "persona.serviceName" -}}
{{- printf "%s-%s" (include "persona.fullname" .ctx) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ServiceAccount of the pod serving train: split → its own (the RBAC binding's only subject); combined → the
persona pods'. */}}
{{- define "persona.trainServiceAccountName" -}}
{{- if eq .Values.topology "split" }}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-train" (include "persona.fullname" .) | trunc 63 | trimSuffix "-") .Values.serviceAccount.trainName }}
{{- else }}
{{- default (include "persona.serviceAccountName" .) .Values.serviceAccount.trainName }}
{{- end }}
{{- else }}
{{- include "persona.serviceAccountName" . }}
{{- end }}
{{- end }}

{{/* The ServiceAccount of the training worker pods (train.dispatcher: kubernetes). */}}
{{- define "persona.workerServiceAccountName" -}}
{{- default (printf "%s-train-worker" (include "persona.fullname" .) | trunc 63 | trimSuffix "-") .Values.train.worker.serviceAccountName }}
{{- end }}

{{/* The ConfigMap of non-secret settings every persona pod (and training worker pod) loads with envFrom. */}}
{{- define "persona.configMapName" -}}
{{- printf "%s-env" (include "persona.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "true" when metadata is in Postgres (a DSN in values or in an existing Secret), else empty. */}}
{{- define "persona.postgres" -}}
{{- if or .Values.database.postgresDsn .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{/* "true" when the Role/RoleBinding are rendered: rbac.create, or null = exactly with the kubernetes dispatcher. */}}
{{- define "persona.rbacEnabled" -}}
{{- if kindIs "invalid" .Values.rbac.create }}
{{- if eq .Values.train.dispatcher "kubernetes" }}true{{ end }}
{{- else if .Values.rbac.create }}true{{ end }}
{{- end }}

{{/* "true" when the pod serving train needs an API token: it dispatches Kubernetes Jobs, or the Role is bound to
it. No other persona pod ever mounts one. */}}
{{- define "persona.trainToken" -}}
{{- if or (eq .Values.train.dispatcher "kubernetes") (include "persona.rbacEnabled" .) }}true{{ end }}
{{- end }}

{{/* The training worker image: train.worker.image, else persona.image. */}}
{{- define "persona.workerImage" -}}
{{- $w := .Values.train.worker.image }}
{{- $p := .Values.persona.image }}
{{- printf "%s:%s" (default $p.repository $w.repository) (default (default .Chart.AppVersion $p.tag) $w.tag) }}
{{- end }}

{{/* Environment of a persona container (what is not in the ConfigMap or Secret): the DSN from
database.existingSecret, the kubernetes dispatcher's settings on the pod serving train, the sidecar Triton's address
and repository on a drawing pod with triton.placement: sidecar, persona.extraEnv.
include "persona.podEnv" (dict "ctx" $ "runsTrain" true "sidecar" false). */}}
{{- define "persona.podEnv" -}}
{{- $ := .ctx }}
{{- if $.Values.database.existingSecret }}
- name: PERSONA_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.database.existingSecret }}
      key: {{ $.Values.database.existingSecretKey }}
{{- end }}
{{- if and .runsTrain (eq $.Values.train.dispatcher "kubernetes") }}
{{- $w := $.Values.train.worker }}
- name: PERSONA_TRAIN_DISPATCHER
  value: kubernetes
- name: PERSONA_K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: PERSONA_K8S_IMAGE
  value: {{ include "persona.workerImage" $ | quote }}
- name: PERSONA_K8S_SERVICE_ACCOUNT
  value: {{ include "persona.workerServiceAccountName" $ | quote }}
- name: PERSONA_K8S_DATA_CLAIM
  value: {{ include "persona.dataClaim" $ | quote }}
- name: PERSONA_K8S_MODELS_CLAIM
  value: {{ include "persona.modelsClaim" $ | quote }}
- name: PERSONA_K8S_GPU
  value: {{ $w.gpu.count | quote }}
- name: PERSONA_K8S_NODE_SELECTOR
  value: {{ $w.gpu.nodeSelector | toJson | quote }}
- name: PERSONA_K8S_TOLERATIONS
  value: {{ $w.gpu.tolerations | toJson | quote }}
- name: PERSONA_K8S_CONFIGMAP
  value: {{ include "persona.configMapName" $ | quote }}
- name: PERSONA_K8S_SECRET
  value: {{ include "persona.secretName" $ | quote }}
{{- with $.Values.imagePullSecrets }}
{{- $names := list }}
{{- range . }}{{ $names = append $names .name }}{{ end }}
- name: PERSONA_K8S_IMAGE_PULL_SECRETS
  value: {{ join "," $names | quote }}
{{- end }}
{{- end }}
{{- if .sidecar }}
# triton.placement: sidecar — this pod's own Triton and the model repository they share (an emptyDir).
- name: PERSONA_TRITON_URL
  value: {{ include "persona.tritonUrl" $ | quote }}
- name: PERSONA_TRITON_REPOSITORY
  value: /models
{{- end }}
{{- with $.Values.persona.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* THE Triton container, one definition for both placements: the Triton Deployment's (service) and the sidecar in
each drawing persona pod (sidecar). dict: ctx: $; name: container name; portPrefix: prefix of the port names (""
in the Triton Deployment; "triton-" in a persona pod, whose persona container already names its port grpc);
tmpVolume: the emptyDir mounted at /tmp. Mounts the pod's volumes `models` (/models, read-only: persona writes
the repository, Triton reads it), tmpVolume and `shm` (persona.tritonShmVolume). */}}
{{- define "persona.tritonContainer" -}}
{{- $ := .ctx }}
{{- $t := $.Values.triton }}
{{- $pp := .portPrefix -}}
- name: {{ .name }}
  image: {{ include "persona.image" (dict "image" $t.image "ctx" $) | quote }}
  imagePullPolicy: {{ $t.image.pullPolicy }}
  args:
    - tritonserver
    - --model-repository=/models
    - --model-control-mode=explicit
    - --grpc-port={{ $t.ports.grpc }}
    - --http-port={{ $t.ports.http }}
    - --metrics-port={{ $t.ports.metrics }}
  env:
    - name: HOME
      value: /tmp
  ports:
    - name: {{ $pp }}grpc
      containerPort: {{ $t.ports.grpc }}
      protocol: TCP
    - name: {{ $pp }}http
      containerPort: {{ $t.ports.http }}
      protocol: TCP
    - name: {{ $pp }}metrics
      containerPort: {{ $t.ports.metrics }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /v2/health/live
      port: {{ $pp }}http
    periodSeconds: 10
    failureThreshold: 30
  livenessProbe:
    httpGet:
      path: /v2/health/live
      port: {{ $pp }}http
    periodSeconds: 20
    timeoutSeconds: 5
    failureThreshold: 3
  readinessProbe:
    httpGet:
      path: /v2/health/ready
      port: {{ $pp }}http
    periodSeconds: 10
    timeoutSeconds: 5
  resources:
    {{- $resources := deepCopy $t.resources }}
    {{- if $t.gpu.enabled }}
    {{- $limits := default dict $resources.limits }}
    {{- $_ := set $limits "nvidia.com/gpu" (int $t.gpu.count) }}
    {{- $_ := set $resources "limits" $limits }}
    {{- end }}
    {{- toYaml $resources | nindent 4 }}
  securityContext:
    {{- toYaml $t.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
      readOnly: true
    - name: {{ .tmpVolume }}
      mountPath: /tmp
    - name: shm
      mountPath: /dev/shm
{{- end }}

{{/* Triton's in-memory /dev/shm (the python backend passes tensors through shared memory). */}}
{{- define "persona.tritonShmVolume" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.triton.shmSize }}
{{- end }}

{{/* One persona server Deployment (combined, or one split service). dict:
  ctx: $; name: Deployment name; component: label; services: --services value ("" = all);
  pod: replicas, resources, gpu, nodeSelector, tolerations, affinity, podAnnotations; autoscaled: omit replicas;
  strategy: Recreate | RollingUpdate; serviceAccount; token: mount an API token; runsTrain: serves train;
  readinessService: the grpc.health.v1 service name the readiness probe asks ("" = the server);
  sidecar: this pod draws and triton.placement is sidecar, so it runs its own Triton container. */}}
{{- define "persona.serverDeployment" -}}
{{- $ := .ctx }}
{{- $p := $.Values.persona }}
{{- $pod := .pod }}
{{- $sidecarMode := include "persona.tritonSidecar" $ -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  labels:
    {{- include "persona.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ $pod.replicas }}
  {{- end }}
  strategy:
    type: {{ .strategy }}
  selector:
    matchLabels:
      {{- include "persona.selectorLabels" (dict "ctx" $ "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "persona.labels" $ | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
      annotations:
        # Roll the pods when the settings or the Secret's content change.
        checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
        checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") $ | sha256sum }}
        {{- with $pod.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ .serviceAccount }}
      # Only the pod serving train with the kubernetes dispatcher talks to the Kubernetes API.
      automountServiceAccountToken: {{ .token }}
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $p.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $p.terminationGracePeriodSeconds }}
      containers:
        - name: persona
          image: {{ include "persona.image" (dict "image" $p.image "ctx" $) | quote }}
          imagePullPolicy: {{ $p.image.pullPolicy }}
          args:
            - persona-cli
            - serve
            {{- with .services }}
            - --services={{ . }}
            {{- end }}
            - --host=0.0.0.0
            - --port={{ $p.port }}
            - --data-dir=/data
            - --auth={{ $p.auth }}
            - --engine={{ $p.engine }}
            - --log-level={{ $p.logLevel }}
          ports:
            - name: grpc
              containerPort: {{ $p.port }}
              protocol: TCP
          {{- with include "persona.podEnv" (dict "ctx" $ "runsTrain" .runsTrain "sidecar" .sidecar) | trim }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          envFrom:
            # Non-secret PERSONA_* / HF_* settings (the same ConfigMap the training workers load).
            - configMapRef:
                name: {{ include "persona.configMapName" $ }}
            - secretRef:
                name: {{ include "persona.secretName" $ }}
                # An existingSecret must exist; the chart's own may be empty.
                optional: {{ not $.Values.secret.existingSecret }}
          # Kubernetes' native gRPC probes call grpc.health.v1.Health/Check, which persona serves: "" is the server,
          # readiness asks for the service this pod serves.
          startupProbe:
            grpc:
              port: {{ $p.port }}
              service: ""
            periodSeconds: 10
            failureThreshold: {{ $p.probes.startupFailureThreshold }}
          livenessProbe:
            grpc:
              port: {{ $p.port }}
              service: ""
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 3
          readinessProbe:
            grpc:
              port: {{ $p.port }}
              service: {{ .readinessService | quote }}
            periodSeconds: 10
            timeoutSeconds: 5
          resources:
            {{- $resources := deepCopy $pod.resources }}
            {{- if $pod.gpu.enabled }}
            {{- $limits := default dict $resources.limits }}
            {{- $_ := set $limits "nvidia.com/gpu" (int $pod.gpu.count) }}
            {{- $_ := set $resources "limits" $limits }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $p.securityContext | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: /data
            - name: models
              mountPath: /models
            - name: tmp
              mountPath: /tmp
        {{- if .sidecar }}
        # triton.placement: sidecar — this pod's own Triton, reading the repository its persona container writes.
        {{- include "persona.tritonContainer" (dict "ctx" $ "name" "triton" "portPrefix" "triton-" "tmpVolume" "triton-tmp") | nindent 8 }}
        {{- end }}
      volumes:
        - name: data
          persistentVolumeClaim:
            claimName: {{ include "persona.dataClaim" $ }}
        {{- if $sidecarMode }}
        # triton.placement: sidecar — a model repository per pod (its own Triton's, where it draws; persona creates
        # the folder in every pod). Rebuilt from the ONNX exports cached on the data volume, never re-exported.
        - name: models
          emptyDir: {}
        {{- else }}
        - name: models
          persistentVolumeClaim:
            claimName: {{ include "persona.modelsClaim" $ }}
        {{- end }}
        - name: tmp
          emptyDir: {}
        {{- if .sidecar }}
        - name: triton-tmp
          emptyDir: {}
        {{- include "persona.tritonShmVolume" $ | nindent 8 }}
        {{- end }}
      {{- $nodeSelector := deepCopy $pod.nodeSelector }}
      {{- $tolerations := $pod.tolerations }}
      {{- if $pod.gpu.enabled }}
      {{- $nodeSelector = merge $nodeSelector $pod.gpu.nodeSelector }}
      {{- $tolerations = concat $tolerations $pod.gpu.tolerations }}
      {{- end }}
      {{- if .sidecar }}
      {{- /* The Triton container's placement joins the pod's: triton.nodeSelector/tolerations, and its gpu ones. */}}
      {{- $t := $.Values.triton }}
      {{- $nodeSelector = merge $nodeSelector $t.nodeSelector }}
      {{- $tolerations = concat $tolerations $t.tolerations }}
      {{- if $t.gpu.enabled }}
      {{- $nodeSelector = merge $nodeSelector $t.gpu.nodeSelector }}
      {{- $tolerations = concat $tolerations $t.gpu.tolerations }}
      {{- end }}
      {{- $tolerations = uniq $tolerations }}
      {{- end }}
      {{- with $nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pod.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* An autoscaling/v2 HPA: include "persona.hpa" (dict "ctx" $ "name" NAME "component" C "autoscaling" A
"key" "triton.autoscaling"). */}}
{{- define "persona.hpa" -}}
{{- $a := .autoscaling }}
{{- if and (not $a.targetCPUUtilizationPercentage) (not $a.gpuMetric.name) }}
{{- fail (printf "`%s.enabled` needs a metric: set `%s.targetCPUUtilizationPercentage` or `%s.gpuMetric.name`" .key .key .key) }}
{{- end -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  labels:
    {{- include "persona.labels" .ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .name }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- if $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- end }}
    {{- if $a.gpuMetric.name }}
    # A per-pod custom metric (e.g. DCGM GPU utilisation via prometheus-adapter).
    - type: Pods
      pods:
        metric:
          name: {{ $a.gpuMetric.name }}
        target:
          type: AverageValue
          averageValue: {{ $a.gpuMetric.averageValue | quote }}
    {{- end }}
{{- end }}

{{/* Settings the chart cannot express in values.schema.json (or that deserve a plainer message than the
schema's); rendering stops with a message naming the value. */}}
{{- define "persona.validate" -}}
{{- $v := .Values }}
{{- $postgres := include "persona.postgres" . }}
{{- $dataRWX := has "ReadWriteMany" $v.persistence.data.accessModes }}
{{- /* With triton.placement: sidecar each pod has its own /models: the models PVC need not be shared. */}}
{{- $modelsRWX := or (has "ReadWriteMany" $v.persistence.models.accessModes) (include "persona.tritonSidecar" .) }}
{{- if eq $v.topology "split" }}
{{- if not $postgres }}
{{- fail "`topology: split` runs a pod per service over one metadata store, which SQLite cannot be: set `database.postgresDsn` (or `database.existingSecret`), or use topology: combined" }}
{{- end }}
{{- if not (and $dataRWX $modelsRWX) }}
{{- fail "`topology: split` pods share artifacts and the model repository: `persistence.data.accessModes` and `persistence.models.accessModes` must include ReadWriteMany (a storage class offering RWX: NFS, CephFS, EFS, Filestore, Azure Files)" }}
{{- end }}
{{- if gt (int $v.services.train.replicas) 1 }}
{{- fail "`services.train.replicas` must be 1: interrupted-job recovery assumes one train process; scale training with `train.dispatcher: kubernetes`" }}
{{- end }}
{{- else if gt (int $v.persona.replicas) 1 }}
{{- if not $postgres }}
{{- fail "`persona.replicas` > 1 needs Postgres metadata (`database.postgresDsn` or `database.existingSecret`): SQLite allows one process. Keep persona.replicas: 1, or use topology: split and scale the services there" }}
{{- end }}
{{- if not $dataRWX }}
{{- fail "`persona.replicas` > 1 shares the data volume between pods: `persistence.data.accessModes` must include ReadWriteMany" }}
{{- end }}
{{- end }}
{{- if eq $v.train.dispatcher "kubernetes" }}
{{- if not $postgres }}
{{- fail "`train.dispatcher: kubernetes` needs Postgres metadata (`database.postgresDsn` or `database.existingSecret`): a training worker pod cannot share the server's SQLite file" }}
{{- end }}
{{- if not $dataRWX }}
{{- fail "`train.dispatcher: kubernetes` mounts the data volume in the worker pods too: `persistence.data.accessModes` must include ReadWriteMany" }}
{{- end }}
{{- if and $v.database.existingSecret (or (ne $v.database.existingSecret (include "persona.secretName" .)) (ne $v.database.existingSecretKey "PERSONA_DATABASE_URL")) }}
{{- fail "`train.dispatcher: kubernetes`: the worker pods load only the Secret `secret.existingSecret` (envFrom), so `database.existingSecret` must be that Secret and `database.existingSecretKey` PERSONA_DATABASE_URL" }}
{{- end }}
{{- end }}
{{- if and $v.database.postgresDsn $v.secret.existingSecret }}
{{- fail "`database.postgresDsn` goes into the chart's Secret, which `secret.existingSecret` replaces: put PERSONA_DATABASE_URL in that Secret and set `database.existingSecret` to it instead" }}
{{- end }}
{{- if and $v.database.postgresDsn $v.database.existingSecret }}
{{- fail "set one of `database.postgresDsn` and `database.existingSecret`, not both" }}
{{- end }}
{{- if and (eq $v.persona.engine "triton") (not $v.triton.enabled) (not $v.triton.externalUrl) }}
{{- fail "`persona.engine: triton` needs `triton.enabled: true` or `triton.externalUrl: HOST:PORT`" }}
{{- end }}
{{- if eq $v.triton.placement "sidecar" }}
{{- if ne $v.persona.engine "triton" }}
{{- fail "`triton.placement: sidecar` runs Triton in the pods that draw with it, but `persona.engine` is not triton: set persona.engine: triton, or triton.placement: service" }}
{{- end }}
{{- if or (not $v.triton.enabled) $v.triton.externalUrl }}
{{- fail "`triton.placement: sidecar` runs the chart's own Triton in each drawing pod: it needs `triton.enabled: true` and no `triton.externalUrl` (an external Triton is placement: service)" }}
{{- end }}
{{- if or $v.triton.autoscaling.enabled (gt (int $v.triton.replicas) 1) }}
{{- fail "`triton.placement: sidecar` has no Triton Deployment to scale: leave `triton.autoscaling.enabled` false and `triton.replicas` 1, and scale the drawing pods (services.generate.autoscaling, services.<name>.replicas)" }}
{{- end }}
{{- if has (int $v.persona.port) (list (int $v.triton.ports.grpc) (int $v.triton.ports.http) (int $v.triton.ports.metrics)) }}
{{- fail "`triton.placement: sidecar` puts Triton in the persona pod: `persona.port` must differ from `triton.ports.*`" }}
{{- end }}
{{- end }}
{{- if and $v.triton.autoscaling.enabled (lt (int $v.triton.autoscaling.maxReplicas) (int $v.triton.autoscaling.minReplicas)) }}
{{- fail "`triton.autoscaling.maxReplicas` must be >= `triton.autoscaling.minReplicas`" }}
{{- end }}
{{- $g := $v.services.generate.autoscaling }}
{{- if and $g.enabled (lt (int $g.maxReplicas) (int $g.minReplicas)) }}
{{- fail "`services.generate.autoscaling.maxReplicas` must be >= `services.generate.autoscaling.minReplicas`" }}
{{- end }}
{{- end }}
