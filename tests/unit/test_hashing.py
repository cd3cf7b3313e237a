from splitserve.engine.hashing import MASK64, SPLITMIX_GOLDEN, splitmix64


def test_splitmix64_gives_the_reference_generator_outputs():
    # The splitmix64 generator's outputs are splitmix64(seed + k * golden) for
    # k = 0, 1, ...; these are the published values for seeds 0 and 1234567.
    assert [splitmix64(k * SPLITMIX_GOLDEN & MASK64) for k in range(3)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [splitmix64((1234567 + k * SPLITMIX_GOLDEN) & MASK64) for k in range(5)] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423,
        4593380528125082431, 16408922859458223821]


def test_splitmix64_takes_its_input_mod_2_64():
    assert splitmix64(-1) == splitmix64(MASK64) == 16490336266968443936
    assert splitmix64(1 << 64) == splitmix64(0)
    assert all(0 <= splitmix64(x) <= MASK64 for x in (0, 1, 1 << 63, MASK64, 12345678901234567890))
