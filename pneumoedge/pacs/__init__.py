"""A DICOM node: receive chest X-rays from a PACS, classify them as `infer` does, send results back.

`receive` (Storage SCP + C-ECHO, spool before acknowledging), `spool` (durable files),
`worker` (spool -> prediction -> result row + SR in the outbox), `report` (SR and SC objects,
highdicom), `send` (C-STORE with retries from the outbox), `ledger` (the results file as the
record of what was done), `node` (all of them together, stopped cleanly).
Needs the `pneumoedge[pacs]` extra; nothing here is imported by `pneumoedge` itself.
"""
