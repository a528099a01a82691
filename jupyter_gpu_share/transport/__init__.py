"""How the product's processes reach each other: TLS contexts now; the websocket ends of the
broker, the bridge and the host agent move here (issue 16)."""
