"""Tables, figures and (later) the audit."""
