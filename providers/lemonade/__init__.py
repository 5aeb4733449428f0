"""The Lemonade Server (lemond) runtime: HTTP client, slot provider, simulator."""
