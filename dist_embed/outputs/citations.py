"""BibTeX entries a model card cites: sentence-transformers, and each loss by our key (the papers'
metadata, as their authors published it)."""

SBERT_BIB = """@inproceedings{reimers-2019-sentence-bert,
    title = "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
    author = "Reimers, Nils and Gurevych, Iryna",
    booktitle = "Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing",
    year = "2019",
    publisher = "Association for Computational Linguistics",
    url = "https://arxiv.org/abs/1908.10084",
}"""
CITATIONS = {
    "matryoshka": ("MatryoshkaLoss", """@misc{kusupati2024matryoshka,
    title = {Matryoshka Representation Learning},
    author = {Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and
              Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and
              Sham Kakade and Prateek Jain and Ali Farhadi},
    year = {2024},
    eprint = {2205.13147},
    archivePrefix = {arXiv},
    primaryClass = {cs.LG}
}"""),
    "mnrl": ("MultipleNegativesRankingLoss", """@misc{henderson2017efficient,
    title = {Efficient Natural Language Response Suggestion for Smart Reply},
    author = {Matthew Henderson and Rami Al-Rfou and Brian Strope and Yun-hsuan Sung and
              Laszlo Lukacs and Ruiqi Guo and Sanjiv Kumar and Balint Miklos and Ray Kurzweil},
    year = {2017},
    eprint = {1705.00652},
    archivePrefix = {arXiv},
    primaryClass = {cs.CL}
}"""),
    "cached_mnrl": ("CachedMultipleNegativesRankingLoss", """@misc{gao2021scaling,
    title = {Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author = {Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year = {2021},
    eprint = {2101.06983},
    archivePrefix = {arXiv},
    primaryClass = {cs.LG}
}"""),
    "triplet": ("TripletLoss", """@misc{hermans2017defense,
    title = {In Defense of the Triplet Loss for Person Re-Identification},
    author = {Alexander Hermans and Lucas Beyer and Bastian Leibe},
    year = {2017},
    eprint = {1703.07737},
    archivePrefix = {arXiv},
    primaryClass = {cs.CV}
}"""),
}
