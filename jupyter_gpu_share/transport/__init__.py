"""How the product's processes reach each other: TLS contexts (``tls``) and the websocket
ends of the broker, the bridge and the host agent (``websocket``), one path with and without
TLS, on maintained libraries (the ``websockets`` protocol, tornado's public API, asyncio)."""
