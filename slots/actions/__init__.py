"""Actions: every change to a slot or a node goes through one `do_*` function here, one
module per domain (Zulip's pattern):

* `errors` — `SlotError`, the stable error envelope the API, the CLI and the pages share;
* `audit` — the audit rows (`SlotEvent`) and the observed-state writes;
* `lifecycle` — load, unload, restart, swap, restore, pin, idle unload (lemond calls);
* `config` — create, update and delete slots and nodes (the desired state);
* `pulls` — model downloads with progress.

An action validates, takes the slot with a compare-and-swap on its `state` column (no
database transaction is ever held open across a lemond call: loads take minutes), calls
the provider, records the outcome and a `SlotEvent` in its own transaction, and pushes the
new card after that commits. Views, the admin, commands, the gateway and the reconciler
all call these; nobody else calls the provider. Every action takes its `actor`
(a user, a token's principal, or an `EventActor` name) as a keyword.
"""
