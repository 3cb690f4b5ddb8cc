from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
import types

import pytest

from calibrant.cache import sha256_file
from calibrant.calibration import HUB_CORPORA, OFFLINE_CORPORA, Corpus, corpora, get_corpus
from calibrant.errors import CalibrationError

# ---------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_pinned():
    docs = tuple(f"doc {i}" for i in range(20))
    c = Corpus("news", docs, "x")
    calib, held = c.split("calib"), c.split("heldout")
    assert len(held) == 2 and len(calib) == 18  # 10 %
    assert set(calib).isdisjoint(held) and sorted(calib + held) == sorted(docs)
    assert c.split("all") == list(docs)
    # pinned: the split is a sha256 of name + text, the same on every machine and in every process
    assert sorted(corpora.heldout_indices("news", docs)) == [15, 18]
    assert sorted(corpora.heldout_indices("wiki", docs)) == [7, 8]
    # independent of document order (chosen by content, not position)
    assert set(Corpus("news", tuple(reversed(docs)), "x").split("heldout")) == set(held)


@pytest.mark.parametrize(("k", "held"), [(1, 0), (2, 1), (9, 1), (10, 1), (11, 2), (1000, 100)])
def test_split_sizes(k, held):
    c = Corpus("wiki", tuple(f"t{i}" for i in range(k)), "x")
    assert len(c.split("heldout")) == held
    assert len(c.split("calib")) == k - held


def test_split_unknown_part():
    with pytest.raises(CalibrationError, match="calib, heldout, all"):
        Corpus("wiki", ("a", "b"), "x").split("train")


# ---------------------------------------------------------------------------------------------- parsers


EN = ("The castle was built in the 12th century by the lord of the manor.\nIt is one of the oldest buildings in "
      "the county and it was restored in 1990.")
DE = "Die Burg wurde im 12. Jahrhundert erbaut.\nSie ist eines der ältesten Gebäude der Gegend."
FR = "Le château a été construit au XIIe siècle par le seigneur.\nIl est l'un des plus anciens bâtiments."


def test_wiki_parser_keeps_english_only():
    task = {"examples": [{"input": t, "target": "0"} for t in (DE, EN, FR, EN + "\nMore.")]}
    assert corpora._parse_wiki(task) == [EN, EN + "\nMore."]


def test_dialogue_parser_rebuilds_whole_conversations():
    def ex(turns, target, cid):
        labels = ["agent_A", "agent_B"] if len(turns) % 2 else ["agent_B", "agent_A"]
        text = " ".join(f'{labels[i % 2]}: "{t}"' for i, t in enumerate(turns))
        return {"input": text, "target": f'"{target}"', "comment": cid}

    turns = ["Hi there!", "Hello, do you like jazz?", "Yes, a lot.", "Me too."]
    task = {"examples": [ex(turns[:i], turns[i], "c1") for i in range(1, 4)] + [ex(["Yo"], "Hey", "c2")]}
    docs = corpora._parse_dialogue(task)
    assert docs == ["A: Hi there!\nB: Hello, do you like jazz?\nA: Yes, a lot.\nB: Me too.", "A: Yo\nB: Hey"]


# ---------------------------------------------------------------------------------------------- acquisition


def _fake_sdist(path):
    wiki = {"examples": [{"input": DE, "target": "0"}] + [{"input": f"{EN}\nArticle {i}.", "target": "0"}
                                                           for i in range(12)]}
    news = {"examples": [{"input": f"News story number {i} about the weather.", "target": "s"} for i in range(15)]}
    howto = {"examples": [{"input": f"Open the lid {i}. Pour the water.", "target": "s"} for i in range(10)]}
    chat = {"examples": [{"input": 'agent_A: "Hi"', "target": '"Hello"', "comment": f"t_{i}"} for i in range(3)]}
    chat["examples"][1]["input"] = 'agent_A: "Hi there"'
    blobs = {"wiki": wiki, "news": news, "wikihow": howto, "dialogue": chat}
    with tarfile.open(path, "w:gz") as tf:
        for name, member in [("README", "bigbench-1.0.0/README.md"), *corpora.BIGBENCH_MEMBERS.items()]:
            data = json.dumps(blobs[name]).encode() if name in blobs else b"readme"
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_download(cache, tmp_path, monkeypatch):
    """Replace the 358 MB download with a small tarball holding the same member paths."""
    tarball = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    calls = []

    def download(dest):
        calls.append(dest)
        return shutil.copy(tarball, dest / tarball.name)

    monkeypatch.setattr(corpora, "_download_sdist", lambda dest: corpora.Path(download(dest)))
    monkeypatch.setattr(corpora, "BIGBENCH_SHA256", sha256_file(tarball))
    monkeypatch.setattr(corpora, "EXPECTED_DOCUMENTS", {})
    return calls


def test_acquisition_caches_all_four_and_deletes_the_download(fake_download, cache):
    news = get_corpus("news")
    assert len(fake_download) == 1
    assert len(news.documents) == 15 and news.documents[3] == "News story number 3 about the weather."
    assert news.checksum == sha256_file(cache / "corpora" / "news.json")
    assert get_corpus("wiki").documents[0].startswith("The castle")  # German article dropped
    assert len(get_corpus("wiki").documents) == 12
    assert len(get_corpus("wikihow").documents) == 10
    assert get_corpus("dialogue").documents == ("A: Hi\nB: Hello", "A: Hi there\nB: Hello")  # deduplicated
    assert len(fake_download) == 1  # one download served all four corpora
    assert not fake_download[0].exists()  # the tarball and its temporary folder are gone
    assert not list((cache / "downloads").glob("**/*.tar.gz"))


def test_corrupt_cache_is_reacquired(fake_download, cache):
    first = get_corpus("news")
    path = cache / "corpora" / "news.json"
    path.write_text(path.read_text().replace("weather", "wetter"))
    again = get_corpus("news")
    assert len(fake_download) == 2
    assert again.documents == first.documents and again.checksum == first.checksum
    (cache / "corpora" / "news.json.sha256").unlink()  # a missing sidecar is not trusted either
    get_corpus("news")
    assert len(fake_download) == 3
    get_corpus("news")
    assert len(fake_download) == 3


def test_download_with_wrong_sha_is_refused(fake_download, cache, monkeypatch):
    monkeypatch.setattr(corpora, "BIGBENCH_SHA256", "0" * 64)
    with pytest.raises(CalibrationError, match="sha256"):
        get_corpus("wiki")
    assert not (cache / "corpora" / "wiki.json").exists()


def test_parser_sanity_range_fails_loudly(fake_download, monkeypatch):
    monkeypatch.setattr(corpora, "EXPECTED_DOCUMENTS", {"news": (1001, 1001)})
    with pytest.raises(CalibrationError, match="parsed 15 documents for corpus 'news', expected 1001"):
        get_corpus("news")


def test_missing_members_are_reported(cache, tmp_path):
    bad = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        info = tarfile.TarInfo("bigbench-1.0.0/README.md")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(CalibrationError, match="lacks the task files of dialogue, news, wiki, wikihow"):
        corpora._extract_members(bad, corpora.BIGBENCH_MEMBERS)


# ---------------------------------------------------------------------------------------------- names


def test_unknown_corpus_lists_names_and_suggests(cache):
    with pytest.raises(CalibrationError) as err:
        get_corpus("wikki")
    msg = str(err.value)
    assert "Did you mean 'wiki'?" in msg
    assert all(n in msg for n in OFFLINE_CORPORA + HUB_CORPORA)


@pytest.mark.parametrize("name", HUB_CORPORA)
def test_hub_corpus_without_datasets(cache, monkeypatch, name):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(CalibrationError) as err:
        get_corpus(name)
    msg = str(err.value)
    assert "pip install datasets" in msg and "wiki, news, wikihow, dialogue" in msg


def test_hub_corpus_offline(cache, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(CalibrationError) as err:
        get_corpus("c4")
    msg = str(err.value)
    assert "Hugging Face hub, which is unreachable" in msg and "wiki, news, wikihow, dialogue" in msg
    assert "\n" not in msg


def test_hub_corpus_online_uses_official_test_split(cache, monkeypatch):
    rows = {"train": [" = Alpha = \n", " alpha text \n", " = = Sub = = \n", " more \n", " = Beta = \n", " b \n"],
            "test": [" = Gamma = \n", " g \n"]}

    def load_dataset(path, config, split):
        assert (path, config) == ("wikitext", "wikitext-2-raw-v1")
        return {"text": rows[split]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = get_corpus("wikitext2")
    assert c.split("calib") == ["= Alpha = \n alpha text \n = = Sub = = \n more", "= Beta = \n b"]
    assert c.split("heldout") == ["= Gamma = \n g"]
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert get_corpus("wikitext2").split("heldout") == ["= Gamma = \n g"]  # served from the cache now


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_bigbench_corpora():
    """Downloads the 358 MB bigbench sdist once (cached under $CALIBRANT_CACHE afterwards)."""
    wiki = get_corpus("wiki")
    assert 950 <= len(wiki.documents) <= 1100
    assert all(corpora.english_score(d) > 0.15 for d in wiki.documents)
    assert 8_000_000 < sum(map(len, wiki.documents)) < 10_000_000
    assert len(get_corpus("news").documents) == 1001
    assert len(get_corpus("wikihow").documents) >= 950
    dialogue = get_corpus("dialogue")
    assert len(dialogue.documents) > 1000 and dialogue.documents[0].startswith("A: ")
    for name in OFFLINE_CORPORA:
        c = get_corpus(name)
        held, calib = c.split("heldout"), c.split("calib")
        assert len(held) == -(-len(c.documents) // 10) and set(held).isdisjoint(calib)
