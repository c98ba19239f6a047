"""OpenAI-compatible endpoints: protocol (wire types), api_router (routes), serving (logic)."""
