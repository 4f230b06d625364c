"""The sidecar agent: bootstrap loading and supervision of the application it guards."""
