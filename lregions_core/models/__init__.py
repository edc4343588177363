"""Model adapters, registered by name on import. Heavy libraries (timm, open_clip, diffusers)
are imported inside the adapters' loaders, so importing this package stays cheap."""
