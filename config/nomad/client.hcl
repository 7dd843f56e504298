# Nomad client configuration for nhi.
#
# Docker driver (after `nhictl configure docker`): allow the nhi runtime...
plugin "docker" {
  config {
    allow_runtimes = ["runc", "nhi"]
  }
}
# ...and pick it in each task that should get an identity. The task's workload identity is
# nhi's proof of which Nomad task it is: write it to the task's secrets directory
# (Nomad 1.7 or later; leave `filepath` unset so it lands in secrets/nomad_token):
#   task "api" {
#     driver = "docker"
#     config {
#       image   = "..."
#       runtime = "nhi"
#     }
#     identity {
#       file = true
#     }
#   }
#
# containerd driver (nomad-driver-containerd): one runtime for all its tasks.
plugin "containerd-driver" {
  config {
    enabled            = true
    containerd_runtime = "io.containerd.nhi.v2"
  }
}
#
# Identities follow the Nomad template of /etc/nhi/nhi.toml, e.g.
#   spiffe_id = "nomad/{nomad.namespace}/job/{nomad.job}/task/{nomad.task}"
# with the values of the task's signed workload identity (nomad_namespace, nomad_job_id,
# nomad_task, nomad_allocation_id claims). nhi verifies it against the cluster's keys, saved
# on each node where [nomad] jwks points:
#   nomad operator api /.well-known/jwks.json > /etc/nhi/nomad-jwks.json
# The NOMAD_* variables of the task's environment prove nothing: a job's `env` block can
# override them.
