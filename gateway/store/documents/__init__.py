"""The DMP-style document store (PDSm 3.1.1 / IHE MHD) on top of the built-in FHIR repository.

DocumentReference, List and Binary stay ordinary resources of the repository (readable through
/fhir); the store adds, in the same database and the same write transactions:

- ``doc_blobs``: each document's bytes once, keyed by SHA-256 (content-addressed); the Binary
  resources keep their metadata only, and ``doc_binaries`` says which bytes each one stands for;
- ``doc_index`` and ``doc_tokens``: the ITI-67 search parameters in real columns, so that
  patient + status (+ type...) stays an index lookup at millions of documents;
- the DMP rules: replacement (``relatesTo`` replaces → the old one is superseded in the same
  transaction), the archive flag, visibility codes per audience, author-only logical delete,
  size and SHA-1 hash checked against the bytes, the patient found by INS or IPP, metadata
  checked against the value sets in ``profiles/valuesets`` (warnings in ``pdsm`` mode, 422 in
  ``dmp`` mode).

Everything one request does runs in one write of the repository (one SAVEPOINT inside its group
commit on SQLite, one transaction on PostgreSQL): any failure leaves nothing behind.

The rules are written once, as coroutines over ``DocOps`` (the document tables of one connection)
and the repository's ``fhir_common.Transaction``. The modules, each building only on those listed
after it:

- ``sqlite``, ``postgres``: ``SqliteDocumentStore`` runs the rules synchronously on the SQLite
  repository's threads, ``PgDocumentStore`` awaits them on PostgreSQL;
- ``store``: ``BaseDocumentStore``, the operations of the store for every backend;
- ``publication``: ITI-65 / ITI-105 transactions; ``search``: ITI-67 and ITI-66 searches;
- ``access``: who may see and change what; ``patches``: metadata updates (JSON / FHIRPath Patch);
- ``ops``: ``DocOps`` and the index rows written through it;
- ``model``, ``valuesets``, ``blobs``: the codes, values and protocol, the DMP value sets, the bytes.

``PgDocumentStore`` is imported from ``gateway.store.documents.postgres``, so that a SQLite gateway
never loads the PostgreSQL modules.
"""

from gateway.store.documents.access import is_unrestricted
from gateway.store.documents.blobs import Blob
from gateway.store.documents.model import (
    FEED,
    INVISIBLE_PATIENT,
    INVISIBLE_REPRESENTANTS_LEGAUX,
    IS_ARCHIVED,
    MASQUE_PS,
    MASQUE_PSOCIAL,
    MASQUE_PT,
    MHD_LIST_TYPES,
    VISIBILITY,
    Actor,
    DocumentStore,
    Mode,
    Retrieved,
    Version,
)
from gateway.store.documents.ops import DocOps, index_document, known_blob
from gateway.store.documents.publication import with_submission_set
from gateway.store.documents.search import LIST_SEARCH_PARAMS
from gateway.store.documents.sqlite import SqliteDocumentStore
from gateway.store.documents.store import BaseDocumentStore
from gateway.store.documents.valuesets import DEFAULT_VALUESETS, J02, J04, J06, J07, J08, J10, ValueSets

__all__ = [
    "DEFAULT_VALUESETS",
    "FEED",
    "INVISIBLE_PATIENT",
    "INVISIBLE_REPRESENTANTS_LEGAUX",
    "IS_ARCHIVED",
    "J02",
    "J04",
    "J06",
    "J07",
    "J08",
    "J10",
    "LIST_SEARCH_PARAMS",
    "MASQUE_PS",
    "MASQUE_PSOCIAL",
    "MASQUE_PT",
    "MHD_LIST_TYPES",
    "VISIBILITY",
    "Actor",
    "BaseDocumentStore",
    "Blob",
    "DocOps",
    "DocumentStore",
    "Mode",
    "Retrieved",
    "SqliteDocumentStore",
    "ValueSets",
    "Version",
    "index_document",
    "is_unrestricted",
    "known_blob",
    "with_submission_set",
]
