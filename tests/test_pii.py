import pytest

from jobs.pii import Scrubber, luhn_valid, valid_cn_id

SCRUB = Scrubber.build(extra_patterns={"EMPLOYEE_ID": r"\bEMP-\d{6}\b"}, word_lists={"NAME": ["张伟", "Jane Roe"]})

POSITIVES = [
    ("EMAIL", "联系 zhang.wei+news@example.com.cn 获取"),
    ("EMAIL", "mail me at j_doe@mail-server.org."),
    ("PHONE", "手机13812345678请回电"),
    ("PHONE", "call +86 138 1234 5678 now"),
    ("PHONE", "电话：+8613912345678"),
    ("PHONE", "tel 139-1234-5678"),
    ("PHONE", "办公室 010-62751234 转"),
    ("PHONE", "座机(0755)26781234"),
    ("PHONE", "US office +1 415 555 2671"),
    ("PHONE", "London +44 20 7946 0958."),
    ("ID_NUMBER", "身份证号11010519491231002X。"),
    ("ID_NUMBER", "ID: 440308199901010012"),
    ("BANK_CARD", "card 4111 1111 1111 1111 exp"),
    ("BANK_CARD", "卡号5500000000000004"),
    ("BANK_CARD", "Amex 378282246310005"),
    ("IP", "server at 192.168.1.20 responded"),
    ("IP", "ping 8.8.8.8"),
    ("IP", "v6 host 2001:db8:85a3::8a2e:370:7334 is up"),
    ("IP", "loopback fe80::1ff:fe23:4567:890a"),
    ("EMPLOYEE_ID", "badge EMP-004211 issued"),
    ("NAME", "记者张伟报道"),
    ("NAME", "said Jane Roe, director"),
]

DECOYS = [
    "9.9 is larger than 9.11, and 3.14159 is pi",
    "Python v3.11.7 and version 2.0.1.3 were released",
    "release 10.0.19041.1 of the kernel",
    "see section 3.2.1 and §4.1.2.3",
    "RFC 2119, ISO 8601, GB/T 7714-2015",
    "on 2024-01-15, 2024/01/15, 2024年1月15日 and 15.01.2024",
    "priced ¥1299.00, $19.99, €1,234,567.89",
    "at 12:30:45 the job ran; std::vector<int> and a::b",
    "timestamp 1700000000 and order 20240115123456",
    "coordinates 39.9042, 116.4074",
    "number 12345678901 is not a mobile",
    "ISBN 978-7-111-54742-6",
    "population 1411778724 in 2020",
    "id 110105194912310021 has a wrong check digit",
    "card-like 4111 1111 1111 1112 fails Luhn",
    "version 999.999.999.999 is not an address",
]


@pytest.mark.parametrize("kind,text", POSITIVES)
def test_each_kind_of_pii_is_replaced_by_its_placeholder(kind, text):
    out, counts, _ = SCRUB.scrub(text)
    assert counts == {kind: 1}, (text, out, counts)
    assert f"<{kind}>" in out


@pytest.mark.parametrize("text", DECOYS)
def test_what_only_looks_like_pii_is_left_alone(text):
    out, counts, frac = SCRUB.scrub(text)
    assert (out, counts, frac) == (text, {}, 0.0)


def test_checksums():
    assert valid_cn_id("11010519491231002X") and not valid_cn_id("110105194912310021")
    assert not valid_cn_id("110105194902300021")  # 30 February
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_counts_and_pii_share():
    out, counts, frac = SCRUB.scrub("a@b.io a@b.io 13812345678")
    assert out == "<EMAIL> <EMAIL> <PHONE>"
    assert counts == {"EMAIL": 2, "PHONE": 1}
    assert frac == 1.0
    _, _, small = SCRUB.scrub("Write to a@b.io for the full report on the survey and its method.")
    assert 0 < small < 0.15
