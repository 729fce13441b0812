"""The proxy: the routing table, the upstream client, and the HTTP and WebSocket relays."""
