#!/usr/bin/env bash
# The raygpt cluster's network: a VPC of its own (GCP's `default` network allows SSH and RDP from 0.0.0.0/0), one
# private subnet with Private Google Access, Cloud NAT for egress (images, pip, the hub), and firewall rules that
# admit only traffic between the cluster's nodes (network tag `raygpt`) plus SSH from one CIDR you choose; everything
# else inbound is denied by the network's implied rule. Run once per project; infra/gcp/cluster.yaml uses it.
#   PROJECT=your-gcp-project SSH_CIDR=203.0.113.7/32 [REGION=us-central1] infra/gcp/network.sh
set -euo pipefail
: "${PROJECT:?set PROJECT to the GCP project of the cluster}"
: "${SSH_CIDR:?set SSH_CIDR to the network that may SSH to the nodes, e.g. your VPN range (a /8 or narrower)}"
REGION="${REGION:-us-central1}"
if ! [[ "$SSH_CIDR" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([89]|[12][0-9]|3[0-2])$ ]]; then
  echo "SSH_CIDR=$SSH_CIDR: give an IPv4 CIDR of /8 to /32 (never 0.0.0.0/0)" >&2
  exit 2
fi
g() { gcloud --project "$PROJECT" --quiet "$@"; }
g compute networks create raygpt --subnet-mode=custom
g compute networks subnets create raygpt --network=raygpt --region="$REGION" --range=10.128.0.0/16 \
  --enable-private-ip-google-access
g compute routers create raygpt --network=raygpt --region="$REGION"
g compute routers nats create raygpt --router=raygpt --region="$REGION" --auto-allocate-nat-external-ips \
  --nat-all-subnet-ip-ranges
g compute firewall-rules create raygpt-internal --network=raygpt --direction=INGRESS --action=ALLOW \
  --rules=all --source-tags=raygpt --target-tags=raygpt
g compute firewall-rules create raygpt-ssh --network=raygpt --direction=INGRESS --action=ALLOW \
  --rules=tcp:22 --source-ranges="$SSH_CIDR" --target-tags=raygpt
