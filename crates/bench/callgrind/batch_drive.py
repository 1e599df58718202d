# Driver of batch.sh: sends single or batched compact checks to a Redis on 127.0.0.1.
import hashlib, socket, struct, sys, time
def enc(args):
    out=[b"*%d\r\n"%len(args)]
    for a in args:
        if isinstance(a,str): a=a.encode()
        out.append(b"$%d\r\n%s\r\n"%(len(a),a))
    return b"".join(out)
def read1(s):
    line=s.readline(); k=line[:1]
    if k in (b"+",b":"): return line
    if k==b"-": raise RuntimeError(line)
    if k==b"$":
        n=int(line[1:-2])
        if n>=0: return s.read(n+2)
        return None
    if k==b"*":
        return [read1(s) for _ in range(int(line[1:-2]))]
    raise RuntimeError(line)
port=int(sys.argv[1]); mode=sys.argv[2]; script=sys.argv[3]; calls=int(sys.argv[4]); keys=sys.argv[5]; B=int(sys.argv[6])
src=open(script).read(); sha=hashlib.sha1(src.encode()).hexdigest()
sock=socket.create_connection(("127.0.0.1",port)); s=sock.makefile("rb")
sock.sendall(enc(["SCRIPT","LOAD",src])); read1(s)
tag=str(time.time_ns())
TWO = mode in ("spec", "v1k", "v2k")
def key(i):
    if keys=="fresh": base = "f%s:%d"%(tag,i)
    elif keys=="hot": base = "hot"
    else: base = "e:%d"%(i%int(keys))
    return [base + ":tokens", base + ":time"] if TWO else [base + ":tb"]
single=struct.pack("<ddd",1e9,1e9,1.0)+b"120"
v1=struct.pack("<ddddB",1e9,1e9,1.0,-1.0,3)+b"120"
def flags(j):
    # As the client marks them: 1 when the key came earlier in the batch, 2 when it comes later.
    if keys != "hot": return 0
    return (1 if j > 0 else 0) + (2 if j < B - 1 else 0)
def packed(n):
    if mode in ("v1", "v1k"): return v1*n
    if mode in ("v2", "v2k"):  # rules once: R, rules '<ddB'+ttl; entries '<BBHdd'
        return struct.pack("<H",1)+struct.pack("<ddB",1e9,1e9,3)+b"120"+b"".join(struct.pack("<BBHdd",0,flags(j),1,1.0,-1.0) for j in range(n))
    raise SystemExit(mode)
i=0
while i<calls:
    if mode=="spec":
        buf=[enc(["EVALSHA",sha,"2"]+key(i+j)+["1000000000","1000000000","1",""]) for j in range(B)]
        sock.sendall(b"".join(buf))
        for _ in range(B):
            r=read1(s)
    elif mode=="single":
        buf=[enc(["EVALSHA",sha,"1"]+key(i+j)+[single]) for j in range(B)]
        sock.sendall(b"".join(buf))
        for _ in range(B):
            r=read1(s)
    else:
        ks=[k for j in range(B) for k in key(i+j)]
        sock.sendall(enc(["EVALSHA",sha,str(len(ks))]+ks+[packed(B)])); r=read1(s)
        if i==0 and len(sys.argv)>7: print(r[:4])
    i+=B
