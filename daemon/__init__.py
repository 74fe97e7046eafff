"""portmeter: exact per-key traffic accounting for Xray servers, counted by nftables."""

__version__ = "0.1.0"
