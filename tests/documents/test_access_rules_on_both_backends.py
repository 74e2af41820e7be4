"""The document access rules on both backends, SQLite and PostgreSQL (live): who changes a
document's status and visibility, audience masks, Lists that name hidden documents, document
versions. The tests of tests/documents are collected here again with the ``repo`` below."""

from __future__ import annotations

from tests.documents.conftest import client, patient_id  # noqa: F401 - fixtures, with this ``repo``
from tests.documents.test_audience import (  # noqa: F401
    test_a_token_with_both_audiences_reads_no_masked_document,
)
from tests.documents.test_document_versions import (  # noqa: F401
    test_a_metadata_update_stores_nothing_invalid,
    test_document_versions_are_read_with_the_documents_rules,
    test_iti105_and_iti65_refuse_what_the_models_let_through,
    test_versions_of_lists_and_other_records_follow_the_callers_scope,
)
from tests.documents.test_list_masking import (  # noqa: F401
    lists,
    test_another_professional_sees_no_entry_or_list_of_a_masked_document,
    test_audience_masks_hide_lists_too,
    test_list_reads_follow_the_same_rule,
    test_the_author_and_unrestricted_callers_see_every_entry,
    test_the_patient_sees_no_list_of_a_document_hidden_from_them,
)
from tests.documents.test_metadata_rights import (  # noqa: F401
    test_a_masked_document_is_not_found_by_a_bundle_patch_of_who_may_not_see_it,
    test_a_professional_who_is_not_the_author_changes_no_status_or_visibility,
    test_the_author_changes_status_and_visibility,
    test_the_patient_masks_and_unmasks_from_professionals_only,
    test_the_patient_patches_only_their_own_documents,
    test_the_patient_still_cannot_read_what_another_professional_tried_to_unhide,
    test_transaction_bundles_follow_the_same_rules,
)
from tests.scale.test_pg_fhir import backend, clock, repo  # noqa: F401 - sqlite, and postgresql (live)
