"""The parts of the kernel side behind counters.Counters (the table's entry point).

- `layout.py`: what the table holds, described once (maps, the hooked chains, a port's objects,
  a key's guard chain), with both encodings derived from it: libnftables JSON to build the table
  and netlink messages to change a port; the layout check and the fingerprint. Pure.
- `exprs.py`: the expressions rules are written with, each with its JSON and netlink forms. Pure.
- `readings.py`: readings per port from dumped or listed objects (TableView, PortReading).
- `netlink.py`: the NETLINK_NETFILTER socket: gets, dumps (taken again when the kernel marks them
  interrupted) and batches.
- `codec.py`: nf_tables (and sock_diag) messages, bytes in and values out. Pure.
- `libnft.py`: the libnftables calls (build, repair, full listings).

Besides counters.py only netinfo.py imports from here (codec.py's sock_diag messages). The
service never does: it uses kernel.py's protocol and types (tests/test_kernel_seam.py checks).
"""
