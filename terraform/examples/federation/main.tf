# Link three clusters into one causeway federation, with locality failover
# for every service the shop namespace exports.
#
#   terraform init && terraform apply
#   terraform output -json join_tokens   # hand each token to its site's gateway
#                                        # (CAUSEWAY_JOIN_TOKEN), then apply again

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

variable "sites" {
  description = "Member sites and their locality labels."
  type        = map(object({ region = string, zone = string }))
  default = {
    "eu-west-1" = { region = "eu", zone = "eu-west-1a" }
    "eu-west-2" = { region = "eu", zone = "eu-west-2a" }
    "us-east-1" = { region = "us", zone = "us-east-1a" }
  }
}

provider "causeway" {
  controllers     = var.controllers
  credentials_dir = var.credentials_dir
}

resource "causeway_site" "member" {
  for_each          = var.sites
  name              = each.key
  labels            = each.value
  token_ttl_seconds = 24 * 3600
}

# Every service exported in `shop`: prefer the caller's zone, then its region,
# then anywhere; a tier below 70% healthy spills to the next.
# No depends_on: a data source that waits for resources is read only at
# apply time, and for_each needs its keys at plan time.
data "causeway_services" "shop" {
  namespace = "shop"
}

resource "causeway_policy" "shop_failover" {
  for_each = { for s in data.causeway_services.shop.services : s.name => s }
  document = yamlencode({
    apiVersion = "causeway.dev/v1alpha1"
    kind       = "FailoverPolicy"
    metadata   = { name = "${each.key}-locality", namespace = "shop" }
    spec = {
      service          = each.key
      mode             = "locality"
      healthyThreshold = 0.7
    }
  })
}

output "join_tokens" {
  description = "One-time join tokens, per site (until it has joined)."
  value       = { for name, s in causeway_site.member : name => s.join_token if !s.joined }
  sensitive   = true
}

output "members" {
  value = [for s in data.causeway_sites.all.sites : "${s.name} (${s.trust_domain}) available=${s.available}"]
}

data "causeway_sites" "all" {}
