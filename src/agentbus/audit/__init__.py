"""Auditors' tools: replay and export, the hash-chain notary and its verification, redaction of
inbound text, and erasure by crypto-shredding."""
