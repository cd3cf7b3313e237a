from splitserve.cluster.planning.samples import AZURE, MOONCAKE, write

write()
print(f"wrote {MOONCAKE} and {AZURE}")
