#!/usr/bin/env bash
# The raygpt cluster's security group: all traffic between the cluster's own nodes, SSH from one CIDR you choose,
# nothing else inbound (Ray's default group opens SSH to 0.0.0.0/0). Run once per VPC; prints the group id for
# `SecurityGroupIds` in infra/aws/cluster.yaml.
#   VPC_ID=vpc-0abc... SSH_CIDR=203.0.113.7/32 [REGION=us-west-2] infra/aws/security_group.sh
set -euo pipefail
: "${VPC_ID:?set VPC_ID to the VPC of the private subnets of the cluster}"
: "${SSH_CIDR:?set SSH_CIDR to the network that may SSH to the nodes, e.g. your VPN range (a /8 or narrower)}"
REGION="${REGION:-us-west-2}"
if ! [[ "$SSH_CIDR" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([89]|[12][0-9]|3[0-2])$ ]]; then
  echo "SSH_CIDR=$SSH_CIDR: give an IPv4 CIDR of /8 to /32 (never 0.0.0.0/0)" >&2
  exit 2
fi
sg=$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC_ID" --group-name raygpt \
  --description "raygpt: intra-cluster traffic and SSH from $SSH_CIDR" --query GroupId --output text)
# every port between members of this group (GCS, raylets, object manager, NCCL, the dashboard)
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$sg" \
  --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg}]" > /dev/null
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$sg" \
  --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$SSH_CIDR,Description=raygpt-ssh}]" > /dev/null
echo "$sg"
