# Put a Kubernetes cluster into the federation: invite it as a site, and
# render its manifests with the causeway_kubernetes_manifests data source
# (the same objects `causeway install` prints). apply.tf applies them with
# the kubernetes provider.
#
#   terraform init && terraform apply
#   # create the causeway-site Secret from a state directory joined with
#   # the join_token output (see the README, "Install into Kubernetes"),
#   # then the gateway, DNS and agent pods start.

terraform {
  required_providers {
    causeway = {
      source  = "causeway.local/causeway/causeway"
      version = "0.1.0"
    }
  }
}

variable "controllers" {
  description = "Controller API endpoints, host:port."
  type        = list(string)
  default     = ["10.0.0.5:7001", "10.0.0.6:7001", "10.0.0.7:7001"]
}

variable "credentials_dir" {
  description = "What `causeway ca init` wrote: ca.pem, admin.pem, admin-key.pem."
  type        = string
  default     = "causeway-creds"
}

variable "site" {
  description = "The cluster's site name."
  type        = string
  default     = "eu-west-1"
}

variable "advertise" {
  description = "Where other sites reach this cluster's gateways: the tunnel LoadBalancer's ip:port."
  type        = list(string)
  default     = ["203.0.113.10:15443"]
}

variable "image" {
  description = "Container image of the causeway binary."
  type        = string
  default     = "causeway:0.1.0"
}

provider "causeway" {
  controllers     = var.controllers
  credentials_dir = var.credentials_dir
}

resource "causeway_site" "cluster" {
  name   = var.site
  labels = { zone = "${var.site}a" }
}

data "causeway_kubernetes_manifests" "cluster" {
  site                 = causeway_site.cluster.name
  advertise            = var.advertise
  image                = var.image
  controller_endpoints = var.controllers
  dns_cluster_ip       = "10.96.0.53"
}

output "join_token" {
  description = "Redeem once with `causeway gateway --join-token` to make the site's state directory."
  value       = causeway_site.cluster.join_token
  sensitive   = true
}

output "manifests" {
  description = "The site's objects, one YAML document each, in apply order."
  value       = data.causeway_kubernetes_manifests.cluster.documents
}
