"""Pure Xray knowledge: what a key's inbound looks like, how a config is read, checked, migrated
and shared. No module here touches a file, a socket or a process; `daemon.xray_io` does that.

Modules, each importing only those above it: `model` (errors, options, keys, which inbounds are
portmeter's), `text` (Xray's JSON-with-comments reader), `reality` (X25519 keys, short ids),
`vlessenc` (the client half of VLESS Encryption), `render` (inbounds, the api section, routing
rules that follow keys, whole configs), `links` (vless:// links, subscriptions), `drift` (checks
as Xray's loader makes them, and the drift report), `migration` (plan and apply a migration).
"""
