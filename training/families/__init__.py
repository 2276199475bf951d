"""Model families: one module per architecture, each implementing ``base.ModelFamily``."""
