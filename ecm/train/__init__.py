"""Training: the generic loop, the ECM adapter task (``ecm-train``) and backbone pretraining (``ecm-pretrain``)."""
