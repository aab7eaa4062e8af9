"""The site's approval decision (approvals.needs_approval), pure, and its store on a real SQLite file."""

import pytest

from client.approvals import (APPROVE_EVERY_TASK, APPROVE_NEW_DIGESTS, WHITELIST, ApprovalStore, needs_approval)

DIGEST, OTHER = "sha256:" + "a" * 64, "sha256:" + "b" * 64
NOW = 1_000_000.0


@pytest.fixture
def store(tmp_path):
    return ApprovalStore(tmp_path / "approvals.sqlite")


def decide(store, policy, digest=DIGEST, researcher="alice", claim_key="claim-1", now=NOW):
    waiting, approval = needs_approval(policy, digest, researcher, claim_key, "f" * 64, store.approvals_of(digest), now)
    return waiting.reason if waiting else None, approval


def test_the_whitelist_policy_never_waits(store):
    assert decide(store, WHITELIST) == (None, None)


def test_a_digest_waits_until_approved_for_its_researcher_and_until_its_approval_expires(store):
    waits, _ = decide(store, APPROVE_NEW_DIGESTS)
    assert waits == f"waits for the site's IT officer to approve image {DIGEST} (a digest the site has not approved yet)"
    store.approve(DIGEST, "officer", researcher="bob", now=NOW)
    assert decide(store, APPROVE_NEW_DIGESTS)[0] is not None  # bob's approval is not alice's
    store.approve(OTHER, "officer", now=NOW)
    assert decide(store, APPROVE_NEW_DIGESTS)[0] is not None  # another digest's approval is not this one's
    approval = store.approve(DIGEST, "officer", expires_at=NOW + 60, now=NOW)
    assert decide(store, APPROVE_NEW_DIGESTS) == (None, approval)
    assert decide(store, APPROVE_NEW_DIGESTS, now=NOW + 60)[0] is not None  # expired


def test_every_task_waits_and_an_approval_holds_for_the_claim_it_was_given_on_only(store):
    store.approve(DIGEST, "officer", now=NOW)  # a digest approval does not approve tasks
    waits, _ = decide(store, APPROVE_EVERY_TASK)
    assert waits.startswith(f"waits for the site's IT officer to approve this task (image {DIGEST}, input sha256 ")
    approval = store.approve(DIGEST, "officer", run_id=7, claim_key="claim-1", input_sha256="f" * 64, now=NOW)
    assert decide(store, APPROVE_EVERY_TASK) == (None, approval)
    # The same run id claimed again is another claim: it waits again.
    assert decide(store, APPROVE_EVERY_TASK, claim_key="claim-2")[0] is not None


def test_the_first_denial_and_the_first_review_of_a_claim_stand(store):
    store.deny(7, "claim-1", "not reviewed", "officer", now=NOW)
    assert store.deny(7, "claim-1", "changed my mind", "other", now=NOW + 1).reason == "not reviewed"
    assert store.denial_of("claim-2") is None
    assert store.review(7, "claim-1", True, "officer", now=NOW).released
    assert store.review(7, "claim-1", False, "other", "too late", now=NOW + 1).released
    assert store.review_of("claim-2") is None
