# Applies the site's manifests to the cluster with the kubernetes provider
# (one kubernetes_manifest per object, CRDs first as rendered).

terraform {
  required_providers {
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.35"
    }
  }
}

variable "kubeconfig" {
  description = "The cluster's kubeconfig."
  type        = string
  default     = "~/.kube/config"
}

provider "kubernetes" {
  config_path = var.kubeconfig
}

locals {
  objects = {
    for doc in data.causeway_kubernetes_manifests.cluster.documents :
    "${yamldecode(doc).kind}/${try(yamldecode(doc).metadata.namespace, "")}/${yamldecode(doc).metadata.name}" => yamldecode(doc)
  }
}

resource "kubernetes_manifest" "site" {
  for_each = local.objects
  manifest = each.value
}
