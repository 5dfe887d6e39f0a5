"""IAM policy evaluation for the tests, with the parts moto's evaluator leaves out.

moto (moto/iam/access_control.py) matches Action and Resource but treats every Condition of an identity
policy as met, so a PassRole limited to the wrong service or a tag condition that never matches passes
there. This evaluates identity policies the way AWS documents it for one account without boundaries or
SCPs: an explicit Deny wins, otherwise one Allow whose Action, Resource and every Condition match allows,
otherwise the request is implicitly denied. Conditions: the String*, Arn*, Bool and Null operators, the
IfExists suffix and the ForAllValues/ForAnyValue set prefixes; context keys are case-insensitive.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

IAM_DIR = Path(__file__).resolve().parents[1] / "bootstrap" / "iam"


def fill(name: str, bucket: str, account: str, region: str) -> dict[str, Any]:
    """A policy of bootstrap/iam with its placeholders filled in, as the README's `fill` does."""
    text = (IAM_DIR / name).read_text()
    text = text.replace("FRUITS_BUCKET", bucket).replace("ACCOUNT_ID", account).replace("REGION", region)
    return json.loads(text)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _glob(pattern: str, value: str, case: bool = True) -> bool:
    """IAM wildcards: * any run of characters, ? one character; nothing else is special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case else re.IGNORECASE) is not None


def _action_matches(patterns: Iterable[str], action: str) -> bool:
    return any(_glob(p, action, case=False) for p in patterns)


def _resource_matches(patterns: Iterable[str], resource: str) -> bool:
    return any(_glob(p, resource) for p in patterns)


def _op(name: str, expected: str, actual: str) -> bool:
    if name in ("StringEquals", "ArnEquals"):
        return expected == actual
    if name == "StringEqualsIgnoreCase":
        return expected.lower() == actual.lower()
    if name in ("StringLike", "ArnLike"):
        return _glob(expected, actual)
    if name == "Bool":
        return str(expected).lower() == str(actual).lower()
    raise ValueError(f"condition operator {name} is not implemented here")


_NEGATED = {"StringNotEquals": "StringEquals", "StringNotLike": "StringLike", "ArnNotLike": "ArnLike"}


def _condition_holds(operator: str, key: str, expected: Any, context: Mapping[str, Any]) -> bool:
    ctx = {k.lower(): v for k, v in context.items()}
    values = ctx.get(key.lower())
    expected_values = [str(e) for e in _as_list(expected)]
    if operator == "Null":
        return (values is None) == (expected_values[0].lower() == "true")
    qualifier, _, op = operator.rpartition(":")
    if_exists = op.endswith("IfExists")
    op = op.removesuffix("IfExists")
    if values is None:
        # A missing key: IfExists and the negated operators hold, the others do not.
        return if_exists or op in _NEGATED or qualifier == "ForAllValues"
    actual = [str(v) for v in _as_list(values)]
    positive = _NEGATED.get(op, op)

    def one(a: str) -> bool:
        hit = any(_op(positive, e, a) for e in expected_values)
        return not hit if op in _NEGATED else hit

    if qualifier == "ForAllValues":
        return all(one(a) for a in actual)
    if qualifier == "ForAnyValue":
        return any(one(a) for a in actual)
    return one(actual[0]) if len(actual) == 1 else any(one(a) for a in actual)


def _statement_applies(st: Mapping[str, Any], action: str, resource: str, context: Mapping[str, Any]) -> bool:
    if "Action" in st and not _action_matches(_as_list(st["Action"]), action):
        return False
    if "NotAction" in st and _action_matches(_as_list(st["NotAction"]), action):
        return False
    if "Resource" in st and not _resource_matches(_as_list(st["Resource"]), resource):
        return False
    if "NotResource" in st and _resource_matches(_as_list(st["NotResource"]), resource):
        return False
    for operator, block in (st.get("Condition") or {}).items():
        for key, expected in block.items():
            if not _condition_holds(operator, key, expected, context):
                return False
    return True


def decide(
    policies: Iterable[Mapping[str, Any]],
    action: str,
    resource: str,
    context: Mapping[str, Any] | None = None,
) -> str:
    """'allow', 'deny' (explicit) or 'implicit-deny' for one request against identity policies."""
    allowed = False
    for policy in policies:
        for st in _as_list(policy["Statement"]):
            if _statement_applies(st, action, resource, context or {}):
                if st["Effect"] == "Deny":
                    return "deny"
                allowed = True
    return "allow" if allowed else "implicit-deny"


def allowed(policies: Iterable[Mapping[str, Any]], action: str, resource: str, context=None) -> bool:
    return decide(list(policies), action, resource, context) == "allow"


def s3_object_arn(bucket: str, key: str) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


__all__ = ["allowed", "decide", "fill", "s3_object_arn"]
