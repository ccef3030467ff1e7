"""The contacts service. Contacts, lists, custom attributes, suppression and unsubscribe."""
