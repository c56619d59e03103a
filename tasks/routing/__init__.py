"""The customer-service routing workload: messages in; an intent and its reply, or a hand-off to a person, out."""
