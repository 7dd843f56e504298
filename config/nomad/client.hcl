# Nomad client configuration for nhi.
#
# Docker driver (after `nhictl configure docker`): allow the nhi runtime...
plugin "docker" {
  config {
    allow_runtimes = ["runc", "nhi"]
  }
}
# ...and pick it in each task that should get an identity:
#   task "api" {
#     driver = "docker"
#     config {
#       image   = "..."
#       runtime = "nhi"
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
# from the NOMAD_* variables the Nomad client writes into every task.
