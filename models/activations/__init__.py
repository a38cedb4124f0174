"""The big model's states read out for clients: probe scores and SAE features of the tokens a
request generates (`tandem.activations`), features of any text (`/v1/features/extract`), and
the opt-in activation store (Parquet files under a configured directory)."""
