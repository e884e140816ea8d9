"""The canteen's stored-value ledger: purses debited exactly once per (terminal, txn_id).

`rules` holds the pure decisions, `service.Ledger` the transactions, `reports` the read
side, `mqtt_handler` the glue between CONTRACT.md payloads and the ledger.
"""
