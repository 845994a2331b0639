"""Curation: raw photos -> audited, aligned, identity-grouped dataset. Never imports diffusion or methods."""
