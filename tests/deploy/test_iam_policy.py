"""deploy/iam-policy.json: the least-privilege policy of the operator and ami/.

`load_policy_actions()` and `uncovered()` are the pieces the bench test that records every EC2/SSM call
uses to check that the code calls nothing the policy does not allow.
"""

from __future__ import annotations

import json
from typing import Any

from tests.deploy.chart import IAM_POLICY
from tilehopper import contracts

MANAGED_BY_TAG = contracts.TAG_MANAGED_BY

# Actions that change or remove something that exists: only allowed on resources tagged as ours.
DESTRUCTIVE = {
    "ec2:TerminateInstances",
    "ec2:DeleteSecurityGroup",
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:RevokeSecurityGroupIngress",
    "ec2:DeregisterImage",
    "ec2:DeleteSnapshot",
}


def load_policy() -> dict[str, Any]:
    return dict(json.loads(IAM_POLICY.read_text()))


def statements() -> list[dict[str, Any]]:
    return list(load_policy()["Statement"])


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def load_policy_actions() -> set[str]:
    """Every action the policy allows, as written ("ec2:RunInstances", "ssm:GetParameter", ...)."""
    return {action for st in statements() if st["Effect"] == "Allow" for action in _as_list(st["Action"])}


def uncovered(calls: set[str]) -> set[str]:
    """The recorded calls ("ec2:DescribeInstances" or boto3-style "ec2.describe_instances") the policy lacks."""
    allowed = {a.lower() for a in load_policy_actions()}
    missing = set()
    for call in calls:
        service, _, operation = call.replace(".", ":", 1).partition(":")
        action = f"{service}:{operation.replace('_', '')}".lower()
        if action not in allowed:
            missing.add(call)
    return missing


def conditions_of(action: str) -> list[dict[str, Any]]:
    return [st.get("Condition", {}) for st in statements() if action in _as_list(st["Action"])]


def test_policy_is_valid_and_allow_only() -> None:
    policy = load_policy()
    assert policy["Version"] == "2012-10-17"
    sids = [st["Sid"] for st in policy["Statement"]]
    assert len(sids) == len(set(sids))
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and st["Action"] and st["Resource"], st
        assert "NotAction" not in st and "NotResource" not in st


def test_only_ec2_and_ssm_and_no_wildcard_actions() -> None:
    actions = load_policy_actions()
    assert {a.split(":")[0] for a in actions} == {"ec2", "ssm"}
    assert not [a for a in actions if "*" in a]
    assert {a for a in actions if a.startswith("ssm:")} == {"ssm:GetParameter"}


def test_every_destructive_action_needs_our_tag() -> None:
    assert DESTRUCTIVE <= load_policy_actions()
    for action in DESTRUCTIVE:
        for condition in conditions_of(action):
            assert condition.get("StringEquals", {}).get(f"aws:ResourceTag/{MANAGED_BY_TAG}") == contracts.MANAGED_BY, action


def test_unconditioned_statements_are_read_only_or_launch_inputs() -> None:
    for st in statements():
        if "Condition" in st:
            continue
        for action in _as_list(st["Action"]):
            if action.startswith("ec2:Describe") or action.startswith("ssm:Get"):
                continue
            # RunInstances must name the image, subnet and interface it uses; CreateSecurityGroup its VPC.
            resources = _as_list(st["Resource"])
            assert action in {"ec2:RunInstances", "ec2:CreateSecurityGroup"}, action
            assert "*" not in resources and not [r for r in resources if ":instance/" in r or ":security-group/" in r]


def test_launches_only_tagged_hardened_instances() -> None:
    by_resource = {
        resource.rsplit(":", 1)[-1].split("/")[0]: st.get("Condition", {})
        for st in statements() if "ec2:RunInstances" in _as_list(st["Action"])
        for resource in _as_list(st["Resource"])
    }
    request_tag = f"aws:RequestTag/{MANAGED_BY_TAG}"
    assert by_resource["instance"]["StringEquals"][request_tag] == contracts.MANAGED_BY
    assert by_resource["instance"]["StringEquals"]["ec2:MetadataHttpTokens"] == "required"  # IMDSv2
    assert by_resource["volume"]["StringEquals"][request_tag] == contracts.MANAGED_BY
    assert by_resource["volume"]["Bool"]["ec2:Encrypted"] == "true"
    # Only into security groups we made.
    assert by_resource["security-group"]["StringEquals"][f"aws:ResourceTag/{MANAGED_BY_TAG}"] == contracts.MANAGED_BY


def test_tags_are_written_only_while_creating() -> None:
    (condition,) = conditions_of("ec2:CreateTags")
    assert set(condition["StringEquals"]["ec2:CreateAction"]) == {"RunInstances", "CreateSecurityGroup", "CreateImage"}


def test_new_security_groups_and_images_must_carry_our_tag() -> None:
    request_tag = f"aws:RequestTag/{MANAGED_BY_TAG}"
    for action in ("ec2:CreateSecurityGroup", "ec2:CreateImage"):
        tagged = [c for c in conditions_of(action) if c.get("StringEquals", {}).get(request_tag) == contracts.MANAGED_BY]
        assert tagged, action


def test_ssm_reads_only_the_public_amazon_linux_parameters() -> None:
    (st,) = [st for st in statements() if "ssm:GetParameter" in _as_list(st["Action"])]
    assert _as_list(st["Resource"]) == ["arn:aws:ssm:*::parameter/aws/service/ami-amazon-linux-latest/al2023-ami-*"]


def test_uncovered_names_calls_in_either_spelling() -> None:
    assert uncovered({"ec2.run_instances", "ec2:DescribeInstances", "ssm.get_parameter"}) == set()
    assert uncovered({"ec2.create_key_pair", "iam:CreateUser"}) == {"ec2.create_key_pair", "iam:CreateUser"}
