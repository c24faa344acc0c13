"""The LM experiments: job lists per profile (`profiles`), running them (`runner`), tables (`tables`), figures
(`plots`). Training itself is `cola_theory.lm.train.run_lm`; nothing here draws from a model."""
